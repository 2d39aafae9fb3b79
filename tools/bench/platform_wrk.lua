-- wrk script: replays the signed heartbeats of tools/bench/platform_sign.lua
-- in file order, each once, so that no nonce repeats. Use one wrk thread,
-- because every thread would load the file and send the same nonces.
--
--   wrk -t1 -s tools/bench/platform_wrk.lua URL -- signed-file
--
-- After the last line it sends GET /api/v1/heartbeats-exhausted, which
-- returns 404 and so shows as "Non-2xx or 3xx responses": a run that
-- reports any has more requests than the file and is not valid.
local requests = {}
local index = 0
local exhausted

function init(args)
  for line in io.lines(args[1]) do
    local path, ts, nonce, signature, body =
      line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", path, {
      ["Content-Type"] = "application/json",
      ["X-JustAVPS-Machine-Timestamp"] = ts,
      ["X-JustAVPS-Machine-Nonce"] = nonce,
      ["X-JustAVPS-Machine-Signature"] = signature,
    }, body)
  end
  exhausted = wrk.format("GET", "/api/v1/heartbeats-exhausted")
end

function request()
  index = index + 1
  return requests[index] or exhausted
end
