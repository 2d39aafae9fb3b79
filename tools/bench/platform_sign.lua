-- Writes count machine-signed heartbeats for tools/bench/platform_wrk.lua,
-- one a line: path, timestamp, nonce, signature and body, separated by
-- tabs. Heartbeat i is from machine (i - 1) % #machines + 1 of
-- machines-file ("slug token" lines), so all machines send in turn. Each
-- nonce is unique: prefix and i as 12 digits, so a prefix of 4 to 52
-- characters of [A-Za-z0-9_-] gives the 16 to 64 the platform accepts.
--
--   luajit tools/bench/platform_sign.lua machines-file count prefix
--                                        out-file [build-dir]
--
-- The signature follows the machine wire contract: "v1=" and hex
-- HMAC-SHA256(token, "JUSTAVPS-MACHINE-V1\nPOST\npath\nts\nnonce\n" ..
-- hex(sha256(body))). The platform accepts a timestamp up to 30 s from
-- its clock (machine_sig.WINDOW), so every line carries now + 20 s and
-- the file must be used from 10 s before to 50 s after it is written.
local machines_file, count, prefix, out_file = arg[1], tonumber(arg[2]),
  arg[3], arg[4]
local build_dir = arg[5] or "build"
if not machines_file or not count or not prefix or not out_file then
  io.stderr:write("usage: luajit tools/bench/platform_sign.lua ",
    "machines-file count prefix out-file [build-dir]\n")
  os.exit(2)
end

package.cpath = build_dir .. "/lua/?.so;" .. package.cpath
package.path = "lua/?.lua;" .. package.path

local crypto = require("justavps.core").crypto

-- A daemon's usual report: no stage change and no update events, so each
-- heartbeat is the steady-state path.
local BODY = '{"version":"0.1.0","stage":"services_ready",'
  .. '"ports":[{"port":22,"address":"0.0.0.0"},'
  .. '{"port":3000,"address":"127.0.0.1"}],'
  .. '"metrics":{"cpu":{"usage_percent":12.5},'
  .. '"load":{"1":0.5,"5":0.4,"15":0.3},'
  .. '"memory":{"total":4000000000,"available":3000000000},'
  .. '"disk":{"used_bytes":5000000000,"total_bytes":40000000000},'
  .. '"network":{"interfaces":[{"name":"eth0","rx_bytes":1000,'
  .. '"tx_bytes":2000}]}}}'
local body_hash = crypto.hex_encode(crypto.sha256(BODY))

local machines = {}
for line in io.lines(machines_file) do
  local slug, token = line:match("^(%S+) (%S+)$")
  if slug then
    machines[#machines + 1] = { slug = slug, token = token }
  end
end
assert(#machines > 0, "no machines in " .. machines_file)

local ts = tostring(os.time() + 20)
local out = assert(io.open(out_file, "w"))
for i = 1, count do
  local m = machines[(i - 1) % #machines + 1]
  local path = "/api/v1/machines/" .. m.slug .. "/heartbeat"
  local nonce = string.format("%s%012d", prefix, i)
  local signed = table.concat({ "JUSTAVPS-MACHINE-V1", "POST", path, ts,
    nonce, body_hash }, "\n")
  local signature = "v1=" .. crypto.hex_encode(crypto.hmac_sha256(m.token,
    signed))
  out:write(path, "\t", ts, "\t", nonce, "\t", signature, "\t", BODY, "\n")
end
out:close()
