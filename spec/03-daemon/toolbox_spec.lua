-- The daemon toolbox (/_toolbox) against a real `justavps daemon` process:
-- files, confinement, search, exec and background processes, including a
-- daemon restart with a process still running.
local core = require("justavps.core")
local json = require("justavps.json")
local helpers = require("support.helpers")
local rawhttp = require("support.rawhttp")
local th = require("03-daemon.toolbox_helpers")

local async = helpers.async
local crypto = core.crypto

local BASE, ROOT, OUTSIDE
local D


local function sha256_hex(data)
  return crypto.hex_encode(crypto.sha256(data))
end


local function upload(path, data)
  return th.request(D, "PUT", "/files/" .. path, { body = data })
end


local function get(path, headers)
  return th.request(D, "GET", "/files/" .. path, { headers = headers })
end


local function assert_error(res, body, status, code)
  assert.equal(status, res.status, body)
  local decoded = json.decode(body)
  assert.is_table(decoded, body)
  assert.equal(code, decoded.error.code, body)
end


-- Returns the process entry with id from GET /processes.
local function listed(id)
  local _, reply = th.call(D, "GET", "/processes")
  for _, p in ipairs(reply.processes) do
    if p.id == id then
      return p
    end
  end
  return nil
end


local function wait_exited(id)
  return th.eventually(30, function()
    local _, p = th.call(D, "GET", "/processes/" .. id)
    return p.status == "exited" and p
  end)
end


local function log_text(id, offset)
  local res, body = th.request(D, "GET", "/processes/" .. id .. "/logs?offset="
    .. (offset or 0))
  assert.equal(200, res.status, body)
  return body, tonumber(res:header("x-log-offset"))
end


describe("daemon toolbox", function()
  lazy_setup(function()
    BASE = th.tmpdir()
    ROOT = BASE .. "/root"
    OUTSIDE = BASE .. "/outside"
    th.sh("mkdir -p " .. ROOT .. " " .. OUTSIDE)
    th.write_file(OUTSIDE .. "/secret.txt", "outside the root\n")
    helpers.run(function()
      D = th.start_daemon(BASE)
    end, 30)
  end)

  lazy_teardown(function()
    helpers.run(function()
      if D then
        local _, reply = th.call(D, "GET", "/processes")
        for _, p in ipairs(reply.processes) do
          if p.status == "running" then
            core.proc.kill(-p.pgid, "SIGKILL")
          end
        end
        D.stop()
      end
    end, 60)
    th.sh("rm -rf " .. BASE)
  end)

  describe("files", function()
    it("round-trips an upload with its checksum", async(function()
      local parts = {}
      for i = 1, 40 do
        parts[i] = crypto.random_bytes(5000)
      end
      local data = table.concat(parts)

      local res, body = th.request(D, "PUT", "/files/up/data.bin?parents=1", { body = data })
      assert.equal(201, res.status, body)
      local reply = json.decode(body)
      assert.equal(#data, reply.size)
      assert.equal(sha256_hex(data), reply.sha256)
      assert.equal("up/data.bin", reply.path)

      local gres, got = get("up/data.bin")
      assert.equal(200, gres.status)
      assert.equal(#data, tonumber(gres:header("content-length")))
      assert.equal(sha256_hex(data), sha256_hex(got))

      -- A second upload replaces the file and returns 200.
      res, body = upload("up/data.bin", "short\n")
      assert.equal(200, res.status, body)
      assert.equal("short\n", th.read_file(ROOT .. "/up/data.bin"))
    end, 60))

    it("uploads a chunked body", async(function()
      local pieces = { "one ", "two ", "three" }
      local i = 0
      local res, body = th.request(D, "PUT", "/files/chunked.txt", {
        body_reader = function()
          i = i + 1
          return pieces[i]
        end,
      })
      assert.equal(201, res.status, body)
      assert.equal(sha256_hex("one two three"), json.decode(body).sha256)
      assert.equal("one two three", th.read_file(ROOT .. "/chunked.txt"))
    end, 30))

    it("rejects an upload without a parent unless parents=1", async(function()
      local res, body = upload("no/such/dir/f.txt", "x")
      assert_error(res, body, 404, "not_found")
      assert.is_nil(th.read_file(ROOT .. "/no/such/dir/f.txt"))
    end, 30))

    it("serves byte ranges", async(function()
      local data = {}
      for i = 0, 999 do
        data[#data + 1] = string.char(i % 256)
      end
      data = table.concat(data)
      assert.equal(201, (upload("range.bin", data)).status)

      local cases = {
        { "bytes=0-9", 0, 9 },
        { "bytes=100-199", 100, 199 },
        { "bytes=-50", 950, 999 },
        { "bytes=990-", 990, 999 },
        { "bytes=995-5000", 995, 999 },
        { "bytes=-5000", 0, 999 },
      }
      for _, case in ipairs(cases) do
        local range, first, last = case[1], case[2], case[3]
        local res, body = get("range.bin", { Range = range })
        assert.equal(206, res.status, range)
        assert.equal(("bytes %d-%d/1000"):format(first, last), res:header("content-range"), range)
        assert.equal(last - first + 1, tonumber(res:header("content-length")), range)
        assert.equal(data:sub(first + 1, last + 1), body, range)
      end

      for _, range in ipairs({ "bytes=1000-", "bytes=5000-6000", "bytes=-0" }) do
        local res, body = get("range.bin", { Range = range })
        assert_error(res, body, 416, "range_not_satisfiable")
        assert.equal("bytes */1000", res:header("content-range"), range)
      end

      -- A malformed header and a multi-range header are ignored: the whole file.
      for _, range in ipairs({ "bytes=x-y", "bytes=0-1,5-6" }) do
        local res, body = get("range.bin", { Range = range })
        assert.equal(200, res.status, range)
        assert.equal(data, body, range)
      end

      -- If-Range with a stale validator sends the whole file.
      local res, body = get("range.bin", { Range = "bytes=0-9", ["If-Range"] = '"stale"' })
      assert.equal(200, res.status)
      assert.equal(1000, #body)
      local etag = res:header("etag")
      res = get("range.bin", { Range = "bytes=0-9", ["If-Range"] = etag })
      assert.equal(206, res.status)
    end, 30))

    it("rejects an upload over the size limit and leaves nothing", async(function()
      assert.equal(201, (upload("limit/keep.txt?parents=1", "old content\n")).status)
      local head = "PUT /_toolbox/files/limit/keep.txt HTTP/1.1\r\nHost: x\r\n"

      -- A Content-Length over the limit (1 GiB) is rejected before the body.
      local sock = rawhttp.connect(D.port)
      sock:write(head .. "Content-Length: 2147483648\r\n\r\n" .. string.rep("x", 1000))
      local res = assert(rawhttp.read_response(sock))
      sock:close()
      assert.equal(413, res.status)
      assert.equal("too_large", json.decode(res.body).error.code)

      -- A chunked upload that breaks off midway leaves no temporary file.
      sock = rawhttp.connect(D.port)
      sock:write(head .. "Transfer-Encoding: chunked\r\n\r\n")
      local piece = string.rep("y", 60000)
      for _ = 1, 5 do
        sock:write(("%x\r\n%s\r\n"):format(#piece, piece))
      end
      core.sleep(0.2)
      sock:close()

      local clean = th.eventually(10, function()
        local names = th.ls(ROOT .. "/limit")
        return #names == 1 and names[1] == "keep.txt"
      end)
      assert.is_true(clean, "left in limit/: " .. table.concat(th.ls(ROOT .. "/limit"), " "))
      assert.equal("old content\n", th.read_file(ROOT .. "/limit/keep.txt"))
    end, 60))

    it("lists a directory with a cursor", async(function()
      th.sh("mkdir -p " .. ROOT .. "/many/sub")
      for i = 1, 5 do
        th.write_file(ROOT .. "/many/f" .. i .. ".txt", string.rep("a", i))
      end

      local _, page = th.call(D, "GET", "/list/many?limit=4")
      local names = {}
      for _, e in ipairs(page.entries) do
        names[#names + 1] = e.name
      end
      assert.same({ "f1.txt", "f2.txt", "f3.txt", "f4.txt" }, names)
      assert.equal("f4.txt", page.next_cursor)
      assert.equal("file", page.entries[2].type)
      assert.equal(2, page.entries[2].size)
      assert.is_string(page.entries[2].mode)
      assert.is_number(page.entries[2].mtime)

      local _, rest = th.call(D, "GET", "/list/many?limit=4&cursor=" .. page.next_cursor)
      assert.equal(2, #rest.entries)
      assert.equal("f5.txt", rest.entries[1].name)
      assert.equal("sub", rest.entries[2].name)
      assert.equal("directory", rest.entries[2].type)
      assert.is_nil(rest.next_cursor)

      local _, same = th.call(D, "GET", "/files/many?list=1")
      assert.equal(6, #same.entries)

      local res, body = th.request(D, "GET", "/list/many/f1.txt")
      assert_error(res, body, 409, "not_a_directory")
      res, body = get("many")
      assert_error(res, body, 409, "is_directory")
    end, 30))

    it("stats a file, a directory and a link", async(function()
      th.write_file(ROOT .. "/stat.txt", "12345")
      th.sh("ln -sfn stat.txt " .. ROOT .. "/stat-link")
      local res, st = th.call(D, "GET", "/stat/stat.txt")
      assert.equal(200, res.status)
      assert.equal("file", st.type)
      assert.equal(5, st.size)
      assert.equal("stat.txt", st.path)

      local _, dir = th.call(D, "GET", "/stat/many")
      assert.equal("directory", dir.type)

      local _, link = th.call(D, "GET", "/stat/stat-link")
      assert.equal("link", link.type)
      assert.equal("stat.txt", link.target)

      local missing
      res, missing = th.call(D, "GET", "/stat/nope")
      assert.equal(404, res.status)
      assert.equal("not_found", missing.error.code)
    end, 30))

    it("makes directories", async(function()
      local res, reply = th.call(D, "POST", "/mkdir/mk/a/b")
      assert.equal(404, res.status)
      assert.equal("not_found", reply.error.code)

      res = th.call(D, "POST", "/mkdir/mk/a/b?parents=1")
      assert.equal(201, res.status)
      local _, st = th.call(D, "GET", "/stat/mk/a/b")
      assert.equal("directory", st.type)

      res = th.call(D, "POST", "/mkdir/mk/a/b?parents=1")
      assert.equal(200, res.status)
      res, reply = th.call(D, "POST", "/mkdir/mk/a/b")
      assert.equal(409, res.status)
      assert.equal("already_exists", reply.error.code)

      res = th.call(D, "POST", "/mkdir/mk/c")
      assert.equal(201, res.status)
    end, 30))

    it("moves files and respects overwrite", async(function()
      th.write_file(ROOT .. "/mv-a.txt", "a")
      th.write_file(ROOT .. "/mv-b.txt", "b")

      local res, reply = th.call(D, "POST", "/move", { from = "mv-a.txt", to = "mv-b.txt" })
      assert.equal(409, res.status)
      assert.equal("already_exists", reply.error.code)

      res = th.call(D, "POST", "/move", { from = "mv-a.txt", to = "mv-b.txt", overwrite = true })
      assert.equal(200, res.status)
      assert.equal("a", th.read_file(ROOT .. "/mv-b.txt"))
      assert.is_nil(th.read_file(ROOT .. "/mv-a.txt"))

      res = th.call(D, "POST", "/move", { from = "mv-b.txt", to = "mk/c/moved.txt" })
      assert.equal(200, res.status)
      assert.equal("a", th.read_file(ROOT .. "/mk/c/moved.txt"))

      res, reply = th.call(D, "POST", "/move", { from = "nope", to = "x" })
      assert.equal(404, res.status)
      assert.equal("not_found", reply.error.code)

      res, reply = th.call(D, "POST", "/move", { from = "", to = "x" })
      assert.equal(403, res.status)
      assert.equal("root_protected", reply.error.code)

      -- rename(2) refuses a directory into itself; the reply must not
      -- show where the root is on the machine.
      th.sh("mkdir -p " .. ROOT .. "/mv-dir/sub")
      res, reply = th.call(D, "POST", "/move", { from = "mv-dir",
        to = "mv-dir/sub/inner" })
      assert.equal(409, res.status)
      assert.equal("move_failed", reply.error.code)
      assert.falsy(reply.error.message:find(ROOT, 1, true),
        reply.error.message)
    end, 30))

    it("names no host path when the system refuses a path", async(function()
      -- Each name fits NAME_MAX and the relative path PATH_MAX, but the
      -- absolute path under the root passes PATH_MAX, so creating the
      -- upload's file fails with a message that names the absolute path.
      local seg = ("d"):rep(254)
      local parts = {}
      for i = 1, 16 do
        parts[i] = seg
      end
      local rel = table.concat(parts, "/")
      assert.is_true(#rel < 4095)
      local res, body = th.request(D, "PUT", "/files/" .. rel
        .. "/f.txt?parents=1", { body = "x" })
      local reply = json.decode(body)
      assert.is_true(res.status >= 400, tostring(res.status))
      assert.falsy(reply.error.message:find(ROOT, 1, true),
        reply.error.message)
    end, 30))

    it("keeps its JSON UTF-8 for names that are not", async(function()
      local res = th.request(D, "PUT", "/files/utf8dir/bad-%FF.txt?parents=1",
        { body = "x" })
      assert.equal(201, res.status)
      local body
      res, body = th.request(D, "GET", "/list/utf8dir")
      assert.equal(200, res.status)
      -- One such name used to make the whole listing invalid JSON text.
      assert.is_true(core.ws.valid_utf8(body))
      local listing = json.decode(body)
      local entry = listing.entries[1]
      assert.equal("bad-?.txt", entry.name)
      assert.equal(crypto.base64_encode("bad-\255.txt"), entry.name_b64)
    end, 30))

    it("rejects a name longer than Linux allows", async(function()
      local long = ("n"):rep(300)
      local res, body = th.request(D, "PUT", "/files/" .. long,
        { body = "x" })
      local reply = json.decode(body)
      assert.equal(400, res.status)
      assert.equal("invalid_path", reply.error.code)
      assert.truthy(reply.error.message:find("255", 1, true))

      -- The parents of a rejected path are not created either.
      res, body = th.request(D, "PUT", "/files/long-parent/" .. long
        .. "?parents=1", { body = "x" })
      reply = json.decode(body)
      assert.equal(400, res.status)
      assert.equal("invalid_path", reply.error.code)
      assert.falsy(os.execute("test -e " .. ROOT .. "/long-parent") == 0)

      -- A name of 255 bytes is allowed, with its temporary upload file.
      local longest = ("m"):rep(255)
      res = th.request(D, "PUT", "/files/" .. longest, { body = "ok" })
      assert.equal(201, res.status)
      assert.equal("ok", th.read_file(ROOT .. "/" .. longest))
    end, 30))

    it("deletes recursively only with the flag", async(function()
      th.sh("mkdir -p " .. ROOT .. "/del/inner && echo x > " .. ROOT .. "/del/inner/f")
      local res, reply = th.call(D, "DELETE", "/files/del")
      assert.equal(409, res.status)
      assert.equal("directory_not_empty", reply.error.code)
      assert.equal("x\n", th.read_file(ROOT .. "/del/inner/f"))

      res = th.call(D, "DELETE", "/files/del/inner/f")
      assert.equal(200, res.status)
      assert.is_nil(th.read_file(ROOT .. "/del/inner/f"))

      th.write_file(ROOT .. "/del/inner/g", "y")
      res = th.call(D, "DELETE", "/files/del?recursive=1")
      assert.equal(200, res.status)
      res = th.call(D, "GET", "/stat/del")
      assert.equal(404, res.status)

      res, reply = th.call(D, "DELETE", "/files/del")
      assert.equal(404, res.status)
      assert.equal("not_found", reply.error.code)

      res, reply = th.call(D, "DELETE", "/files?recursive=1")
      assert.equal(403, res.status)
      assert.equal("root_protected", reply.error.code)
    end, 30))
  end)

  describe("confinement", function()
    lazy_setup(function()
      th.sh("mkdir -p " .. ROOT .. "/conf && echo inside > " .. ROOT .. "/conf/in.txt")
      th.sh("ln -sfn " .. OUTSIDE .. " " .. ROOT .. "/out-dir")
      th.sh("ln -sfn " .. OUTSIDE .. "/secret.txt " .. ROOT .. "/out-file")
      th.sh("ln -sfn " .. OUTSIDE .. "/missing " .. ROOT .. "/out-dangling")
      th.sh("ln -sfn conf " .. ROOT .. "/in-dir")
    end)

    it("rejects dot segments in the URL", async(function()
      for _, path in ipairs({ "/files/../x", "/files/%2e%2e/x", "/files/conf/%2E%2E/%2e%2e/x",
        "/files/conf%2f..%2f..%2fx" }) do
        local res, body = th.request(D, "GET", path)
        assert_error(res, body, 400, "bad_path")
      end
    end, 30))

    it("rejects absolute and dot paths in bodies and queries", async(function()
      local cases = {
        { "POST", "/move", { from = "/etc/passwd", to = "x" } },
        { "POST", "/move", { from = "conf/in.txt", to = "../x" } },
        { "POST", "/move", { from = "conf/../../x", to = "y" } },
        { "POST", "/exec", { cmd = "/bin/true", cwd = "/" } },
        { "POST", "/exec", { cmd = "/bin/true", cwd = ".." } },
        { "GET", "/search?name=*&path=/etc" },
        { "GET", "/search?name=*&path=.." },
      }
      for _, case in ipairs(cases) do
        local res, reply = th.call(D, case[1], case[2], case[3])
        assert.equal(403, res.status, case[2])
        assert.equal("path_outside_root", reply.error.code, case[2])
      end
      local res, reply = th.call(D, "POST", "/move", { from = "a\0b", to = "x" })
      assert.equal(400, res.status)
      assert.equal("invalid_path", reply.error.code)
    end, 30))

    it("rejects links that leave the root", async(function()
      local cases = {
        { "GET", "/files/out-file" },
        { "GET", "/files/out-dir/secret.txt" },
        { "GET", "/list/out-dir" },
        { "GET", "/stat/out-dir/secret.txt" },
        { "PUT", "/files/out-dir/new.txt" },
        { "PUT", "/files/out-file" },
        { "PUT", "/files/out-dangling" },
        { "POST", "/mkdir/out-dir/sub" },
        { "DELETE", "/files/out-dir/secret.txt" },
        { "GET", "/search?name=*&path=out-dir" },
      }
      for _, case in ipairs(cases) do
        local body = case[1] == "PUT" and "x" or nil
        local res, reply = th.request(D, case[1], case[2], { body = body })
        assert_error(res, reply, 403, "path_outside_root")
      end
      local res, reply = th.call(D, "POST", "/move", { from = "conf/in.txt", to = "out-dir/x" })
      assert.equal(403, res.status)
      assert.equal("path_outside_root", reply.error.code)

      assert.equal("outside the root\n", th.read_file(OUTSIDE .. "/secret.txt"))
      assert.same({ "secret.txt" }, th.ls(OUTSIDE))
    end, 30))

    it("follows links inside the root", async(function()
      local res, body = get("in-dir/in.txt")
      assert.equal(200, res.status)
      assert.equal("inside\n", body)
      res = upload("in-dir/new.txt", "via link\n")
      assert.equal(201, res.status)
      assert.equal("via link\n", th.read_file(ROOT .. "/conf/new.txt"))
    end, 30))

    it("deletes a link to the outside, not its target", async(function()
      th.sh("ln -sfn " .. OUTSIDE .. "/secret.txt " .. ROOT .. "/out-file-2")
      local res = th.call(D, "DELETE", "/files/out-file-2")
      assert.equal(200, res.status)
      assert.equal("outside the root\n", th.read_file(OUTSIDE .. "/secret.txt"))
    end, 30))
  end)

  describe("search", function()
    lazy_setup(function()
      th.sh("mkdir -p " .. ROOT .. "/srch/deep/er")
      th.write_file(ROOT .. "/srch/one.md", "alpha\nneedle here\nomega\n")
      th.write_file(ROOT .. "/srch/deep/er/two.md", "needle again\n")
      th.write_file(ROOT .. "/srch/deep/three.txt", "no match\n")
      th.write_file(ROOT .. "/srch/binary.dat", "needle\0\1\2binary\n")
      th.write_file(ROOT .. "/srch/huge.txt", string.rep("x", 2 * 1024 * 1024) .. "\nneedle\n")
    end)

    it("finds entries by name", async(function()
      local res, reply = th.call(D, "GET", "/search?name=*.md&path=srch")
      assert.equal(200, res.status)
      local found = {}
      for _, r in ipairs(reply.results) do
        found[r.path] = r.type
      end
      assert.same({ ["srch/one.md"] = "file", ["srch/deep/er/two.md"] = "file" }, found)
      assert.is_false(reply.truncated)
      assert.is_false(reply.timed_out)
    end, 30))

    it("finds text and skips binary and huge files", async(function()
      local res, reply = th.call(D, "GET", "/search?content=needle&path=srch")
      assert.equal(200, res.status)
      local found = {}
      for _, r in ipairs(reply.results) do
        found[r.path] = r.line .. ":" .. r.text
      end
      assert.same({
        ["srch/one.md"] = "2:needle here",
        ["srch/deep/er/two.md"] = "1:needle again",
      }, found)
    end, 30))

    it("rejects content of more than one line", async(function()
      -- grep -F would match "needle" alone or "nothing" alone.
      for _, content in ipairs({ "needle%0Anothing", "need%00zzz", "%00" }) do
        local res, reply = th.call(D, "GET", "/search?content=" .. content
          .. "&path=srch")
        assert.equal(400, res.status, content)
        assert.equal("invalid_request", reply.error.code)
        assert.truthy(reply.error.message:find("one line", 1, true))
      end
    end, 30))

    it("bounds the number of results", async(function()
      local res, reply = th.call(D, "GET", "/search?name=*&path=srch&limit=2")
      assert.equal(200, res.status)
      assert.equal(2, #reply.results)
      assert.is_true(reply.truncated)

      res, reply = th.call(D, "GET", "/search?path=srch")
      assert.equal(400, res.status)
      assert.equal("invalid_request", reply.error.code)
    end, 30))
  end)

  describe("exec", function()
    it("streams output as it comes and ends with the exit code", async(function()
      local flag = ROOT .. "/exec-flag"
      local res = th.open(D, "POST", "/exec", {
        cmd = "sh",
        args = { "-c", 'echo one; while [ ! -e "$1" ]; do sleep 0.05; done; echo two >&2; exit 3',
          "sh", flag },
      })
      assert.equal(200, res.status)
      assert.equal("application/x-ndjson", res:header("content-type"))

      -- "one" arrives while the command still waits for the flag file.
      local text, ended = th.read_until(res, "", function(t) return t:find("\n") end)
      assert.is_false(ended)
      assert.same({ { stream = "stdout", data = "one\n" } }, th.ndjson(text))

      th.write_file(flag, "")
      text = th.read_until(res, text, function() return false end)
      res:close()
      local lines = th.ndjson(text)
      assert.same({ stream = "stderr", data = "two\n" }, lines[2])
      assert.equal(3, lines[3].exit_code)
      assert.equal(json.null, lines[3].signal)
      assert.is_false(lines[3].timed_out)
    end, 30))

    it("kills a silent command when the client leaves", async(function()
      local pid_file = ROOT .. "/exec-silent.pid"
      local res = th.open(D, "POST", "/exec", {
        cmd = "sh",
        args = { "-c", 'sleep 300 & echo $! > "$1"; echo started; wait',
          "sh", pid_file },
        timeout = 600,
      })
      assert.equal(200, res.status)
      th.read_until(res, "", function(t) return t:find("\n") end)
      local sleeper = th.eventually(10, function()
        return tonumber(th.read_file(pid_file) or "")
      end)
      assert.is_number(sleeper)

      -- The command prints nothing more, so no write can fail.
      res:close()
      assert.truthy(th.eventually(10, function()
        return th.gone(sleeper)
      end), "sleep " .. sleeper .. " outlived the client")
    end, 30))

    it("passes stdin, env, cwd and binary output", async(function()
      local res, body = th.request(D, "POST", "/exec", { body = json.encode({
        cmd = "sh",
        args = { "-c", 'cat; echo "$GREETING"; pwd; printf "\\377\\376"' },
        env = { GREETING = "hi there" },
        cwd = "conf",
        stdin = "from stdin\n",
      }) })
      assert.equal(200, res.status)
      local out, bytes = {}, {}
      local final
      for _, line in ipairs(th.ndjson(body)) do
        if line.data then
          out[#out + 1] = line.data
        elseif line.data_b64 then
          bytes[#bytes + 1] = crypto.base64_decode(line.data_b64)
        else
          final = line
        end
      end
      local text = table.concat(out) .. table.concat(bytes)
      assert.truthy(text:find("from stdin\n", 1, true), text)
      assert.truthy(text:find("hi there\n", 1, true), text)
      assert.truthy(text:find("/conf\n", 1, true), text)
      assert.truthy(text:find("\255\254", 1, true), text)
      assert.equal(0, final.exit_code)
    end, 30))

    it("reports a missing program", async(function()
      local res, reply = th.call(D, "POST", "/exec", { cmd = "no-such-program-xyz" })
      assert.equal(400, res.status)
      assert.equal("command_not_found", reply.error.code)
      res, reply = th.call(D, "POST", "/exec", { cmd = "/no/such/program" })
      assert.equal(400, res.status)
      assert.equal("command_not_found", reply.error.code)
      res, reply = th.call(D, "POST", "/exec", { args = {} })
      assert.equal(400, res.status)
      assert.equal("invalid_request", reply.error.code)
    end, 30))

    it("kills the whole group on timeout", async(function()
      local res, body = th.request(D, "POST", "/exec", { body = json.encode({
        cmd = "sh",
        args = { "-c", "sleep 300 & echo $!; wait" },
        timeout = 1,
      }) })
      assert.equal(200, res.status)
      local lines = th.ndjson(body)
      local grandchild = tonumber(lines[1].data)
      assert.is_number(grandchild, body)
      local final = lines[#lines]
      assert.is_true(final.timed_out)
      assert.is_not_nil(final.exit_code)
      assert.is_true(th.eventually(10, function() return th.gone(grandchild) end),
        "grandchild " .. grandchild .. " survived the timeout")
    end, 30))

    it("kills what the command left running", async(function()
      local res, body = th.request(D, "POST", "/exec", { body = json.encode({
        cmd = "sh", args = { "-c", "sleep 300 >/dev/null 2>&1 & echo $!" },
      }) })
      assert.equal(200, res.status)
      local lines = th.ndjson(body)
      local grandchild = tonumber(lines[1].data)
      assert.equal(0, lines[#lines].exit_code)
      assert.is_true(th.eventually(10, function() return th.gone(grandchild) end))
    end, 30))
  end)

  describe("processes", function()
    it("starts once per idempotency key", async(function()
      local start = { name = "once", cmd = "sh", args = { "-c", "echo started; sleep 300" },
        idempotency_key = "key-once" }
      local res, first = th.call(D, "POST", "/processes", start)
      assert.equal(201, res.status)
      assert.is_string(first.id)
      assert.is_number(first.pid)
      assert.equal(first.pid, first.pgid)
      assert.equal("running", first.status)

      local again
      res, again = th.call(D, "POST", "/processes", start)
      assert.equal(200, res.status)
      assert.equal(first.id, again.id)
      assert.equal(first.pid, again.pid)

      local count = 0
      local _, list = th.call(D, "GET", "/processes")
      for _, p in ipairs(list.processes) do
        if p.idempotency_key == "key-once" then
          count = count + 1
        end
      end
      assert.equal(1, count)
      assert.is_true(th.eventually(10, function()
        return log_text(first.id) == "started\n"
      end))

      res = th.call(D, "POST", "/processes/" .. first.id .. "/signal", { signal = "SIGKILL" })
      assert.equal(200, res.status)
      local done = wait_exited(first.id)
      assert.equal("SIGKILL", done.signal)
    end, 60))

    it("serves logs from an offset and follows them", async(function()
      local flag = ROOT .. "/proc-flag"
      local res, p = th.call(D, "POST", "/processes", { name = "follow", cmd = "sh",
        args = { "-c", 'echo first; while [ ! -e "$1" ]; do sleep 0.05; done; echo second; exit 7',
          "sh", flag } })
      assert.equal(201, res.status)

      local follow = th.open(D, "GET", "/processes/" .. p.id .. "/logs?offset=2&follow=1")
      assert.equal(200, follow.status)
      assert.equal("2", follow:header("x-log-offset"))
      local text, ended = th.read_until(follow, "", function(t) return t:find("\n") end)
      assert.is_false(ended)
      assert.equal("rst\n", text)

      th.write_file(flag, "")
      text, ended = th.read_until(follow, text, function() return false end)
      follow:close()
      assert.is_true(ended)
      assert.equal("rst\nsecond\n", text)

      local done = wait_exited(p.id)
      assert.equal(7, done.exit_code)
      assert.is_number(done.ended_at)
      assert.equal(13, done.log_end)

      -- Reattach from an offset after the exit.
      local body, offset = log_text(p.id, 6)
      assert.equal(6, offset)
      assert.equal("second\n", body)
      body = log_text(p.id, 13)
      assert.equal("", body)

      -- The exit code stays listed.
      assert.equal(7, listed(p.id).exit_code)
    end, 60))

    it("signals the whole group", async(function()
      local res, p = th.call(D, "POST", "/processes", { name = "group", cmd = "sh",
        args = { "-c", "sleep 300 & echo $!; wait" } })
      assert.equal(201, res.status)
      local child = th.eventually(10, function()
        return tonumber((log_text(p.id)))
      end)
      assert.is_number(child)

      local reply
      res, reply = th.call(D, "POST", "/processes/" .. p.id .. "/signal", { signal = "BOGUS" })
      assert.equal(400, res.status)
      assert.equal("invalid_signal", reply.error.code)

      -- A JSON null is named as JSON, not as the decoder's sentinel.
      res, reply = th.call(D, "POST", "/processes/" .. p.id .. "/signal",
        { signal = json.null })
      assert.equal(400, res.status)
      assert.equal("invalid_signal", reply.error.code)
      assert.truthy(reply.error.message:find("unknown signal null", 1, true),
        reply.error.message)

      res = th.call(D, "POST", "/processes/" .. p.id .. "/signal", { signal = "SIGTERM" })
      assert.equal(200, res.status)
      local done = wait_exited(p.id)
      assert.equal(143, done.exit_code)
      assert.equal("SIGTERM", done.signal)
      assert.is_true(th.eventually(10, function() return th.gone(child) end))

      res, reply = th.call(D, "POST", "/processes/" .. p.id .. "/signal", {})
      assert.equal(409, res.status)
      assert.equal("process_not_running", reply.error.code)

      res = th.call(D, "DELETE", "/processes/" .. p.id)
      assert.equal(200, res.status)
      res = th.call(D, "GET", "/processes/" .. p.id)
      assert.equal(404, res.status)
    end, 60))

    it("keeps the log bounded on disk", async(function()
      local res, p = th.call(D, "POST", "/processes", { name = "loud", cmd = "sh",
        args = { "-c",
          "head -c 20000000 /dev/zero | tr '\\0' a; echo; echo tail-line; sleep 300" } })
      assert.equal(201, res.status)
      -- The sweeper trims the log once a second, so a fast writer can
      -- pass the bound in between: wait for the sweep after the writing.
      local bounded = th.eventually(30, function()
        local entry = listed(p.id)
        return entry.log_end >= 20000011 and entry.log_start > 0
          and entry.log_end - entry.log_start <= 8 * 1024 * 1024 and entry
      end)
      assert.is_table(bounded, "the log start never moved")

      local body, offset = log_text(p.id, 0)
      assert.equal(bounded.log_start, offset)
      assert.equal(bounded.log_end - offset, #body)
      assert.truthy(#body <= 8 * 1024 * 1024)
      assert.equal("tail-line\n", body:sub(-10))
      assert.is_nil(body:find("\0", 1, true))

      local du = io.popen("du -k '" .. BASE .. "/state/processes/" .. p.id .. "/output.log'")
      local kib = tonumber(du:read("*a"):match("^(%d+)"))
      du:close()
      assert.truthy(kib < 12 * 1024, "log uses " .. kib .. " KiB on disk")

      core.proc.kill(-p.pgid, "SIGKILL")
    end, 90))

    it("survives a daemon restart", async(function()
      local flag = ROOT .. "/restart-flag"
      local res, p = th.call(D, "POST", "/processes", { name = "survivor", cmd = "sh",
        args = { "-c",
          'echo before; while [ ! -e "$1" ]; do sleep 0.05; done; echo after; sleep 300',
          "sh", flag } })
      assert.equal(201, res.status)
      -- A failed check below must not leave the loop running forever.
      finally(function()
        core.proc.kill(-p.pgid, "SIGKILL")
      end)
      assert.is_true(th.eventually(10, function() return log_text(p.id) == "before\n" end))

      assert.equal(0, D.stop())
      D = th.start_daemon(BASE)

      local entry = th.eventually(10, function() return listed(p.id) end)
      assert.is_table(entry, "the process is not listed after the restart")
      assert.equal("running", entry.status)
      assert.equal(p.pid, entry.pid)

      -- The process keeps writing its log while the new daemon serves it.
      th.write_file(flag, "")
      assert.is_true(th.eventually(10, function()
        return log_text(p.id) == "before\nafter\n"
      end))

      res = th.call(D, "POST", "/processes/" .. p.id .. "/signal", { signal = "TERM" })
      assert.equal(200, res.status)
      local done = wait_exited(p.id)
      assert.equal(143, done.exit_code)
      assert.equal("SIGTERM", done.signal)
    end, 90))
  end)
end)
