local log = require("justavps.log")

-- A logger whose lines land in a list and whose clock the test sets.
local function capture(opts)
  local lines = {}
  local now = 0
  local enabled = opts and opts.enabled or function() return true end
  local logger = log.new({
    write = function(level, msg, fields)
      lines[#lines + 1] = { level = level, msg = msg, fields = fields }
    end,
    enabled = enabled,
    clock = function() return now end,
    fields = opts and opts.fields,
  })
  return logger, lines, function(t) now = t end
end


describe("log", function()
  it("writes level, message and fields", function()
    local l, lines = capture()
    l.info("listening", { port = 8080 })
    assert.same({ level = "info", msg = "listening",
      fields = { port = 8080 } }, lines[1])
  end)

  it("maps err to the error level", function()
    local l, lines = capture()
    l.err("request failed")
    l.warn("slow")
    l.alert("broken invariant")
    l.debug("detail")
    assert.equal("error", lines[1].level)
    assert.equal("warn", lines[2].level)
    assert.equal("alert", lines[3].level)
    assert.equal("debug", lines[4].level)
  end)

  it("skips disabled levels", function()
    local l, lines = capture({
      enabled = function(level) return level ~= "debug" end,
    })
    l.debug("hidden")
    l.info("shown")
    assert.equal(1, #lines)
    assert.equal("shown", lines[1].msg)
  end)

  it("adds fixed fields in a child logger", function()
    local l, lines = capture()
    local child = l.with({ request_id = "r-1", role = "edge" })
    child.info("done", { status = 200 })
    assert.same({ request_id = "r-1", role = "edge", status = 200 },
      lines[1].fields)
  end)

  it("nests child loggers", function()
    local l, lines = capture()
    l.with({ a = 1 }).with({ b = 2 }).info("x", { c = 3 })
    assert.same({ a = 1, b = 2, c = 3 }, lines[1].fields)
  end)

  it("lets call fields override fixed ones", function()
    local l, lines = capture()
    l.with({ a = 1 }).info("x", { a = 2 })
    assert.equal(2, lines[1].fields.a)
  end)

  describe("redaction", function()
    local names = {
      "secret", "broker_secret", "token", "proxy_token", "password",
      "Authorization", "cookie", "set_cookie", "key", "api_key",
      "x-api-key", "signature", "X-JustAVPS-Signature", "jwt", "ticket",
      "client_secret", "credentials",
    }

    for _, name in ipairs(names) do
      it("redacts field " .. name, function()
        local l, lines = capture()
        l.info("x", { [name] = "hunter2" })
        assert.equal("[redacted]", lines[1].fields[name])
      end)
    end

    local kept = { "keepalive", "monkey", "slug", "status", "path" }
    for _, name in ipairs(kept) do
      it("keeps field " .. name, function()
        local l, lines = capture()
        l.info("x", { [name] = "v" })
        assert.equal("v", lines[1].fields[name])
      end)
    end

    it("redacts fixed fields of a child", function()
      local l, lines = capture()
      l.with({ token = "abc" }).info("x")
      assert.equal("[redacted]", lines[1].fields.token)
    end)

    it("redacts credential-looking values", function()
      local l, lines = capture()
      l.info("x", { header = "Bearer sk_live_abc", value = "sk_live_123",
        sig = "v1=0123456789abcdef" })
      assert.equal("[redacted]", lines[1].fields.header)
      assert.equal("[redacted]", lines[1].fields.value)
      assert.equal("[redacted]", lines[1].fields.sig)
    end)

    it("redacts inside nested tables", function()
      local l, lines = capture()
      l.info("x", { headers = { Cookie = "s=1", Host = "a" } })
      local text = lines[1].fields.headers
      assert.is_string(text)
      assert.not_matches("s=1", text, 1, true)
      assert.matches('"Cookie":"[redacted]"', text, 1, true)
      assert.matches('"Host":"a"', text, 1, true)
    end)

    it("does not change the caller's table", function()
      local l = capture()
      local fields = { token = "abc" }
      l.info("x", fields)
      assert.equal("abc", fields.token)
    end)
  end)

  describe("rate limit", function()
    it("drops repeats past the burst and logs the count", function()
      local l, lines, set_time = capture()
      for _ = 1, log.BURST + 5 do
        l.warn("upstream unreachable", { slug = "m" })
      end
      assert.equal(log.BURST, #lines)
      set_time(log.WINDOW)
      l.warn("upstream unreachable", { slug = "m" })
      assert.equal(5, lines[log.BURST + 1].fields.suppressed)
      assert.equal("upstream unreachable", lines[log.BURST + 1].msg)
      assert.equal("m", lines[log.BURST + 2].fields.slug)
    end)

    it("counts messages separately", function()
      local l, lines = capture()
      for _ = 1, log.BURST do
        l.info("a")
        l.info("b")
      end
      assert.equal(2 * log.BURST, #lines)
    end)

    it("counts levels separately", function()
      local l, lines = capture()
      for _ = 1, log.BURST do
        l.info("a")
        l.err("a")
      end
      assert.equal(2 * log.BURST, #lines)
    end)

    it("writes pending counts on flush", function()
      local l, lines = capture()
      for _ = 1, log.BURST + 3 do
        l.err("disk full")
      end
      l.flush()
      local last = lines[#lines]
      assert.equal("disk full", last.msg)
      assert.equal(3, last.fields.suppressed)
    end)

    it("writes pending counts when another message sweeps", function()
      local l, lines, set_time = capture()
      for _ = 1, log.BURST + 2 do
        l.err("a")
      end
      set_time(log.WINDOW + 1)
      l.info("b")
      assert.equal(2, lines[log.BURST + 1].fields.suppressed)
      assert.equal("b", lines[log.BURST + 2].msg)
    end)

    it("shares limits with child loggers", function()
      local l, lines = capture()
      for i = 1, log.BURST + 1 do
        l.with({ i = i }).info("same")
      end
      assert.equal(log.BURST, #lines)
    end)
  end)

  describe("misuse", function()
    it("raises on a non-string message", function()
      local l = capture()
      assert.has_error(function() l.info({}) end)
    end)

    it("raises on non-table fields", function()
      local l = capture()
      assert.has_error(function() l.info("x", "y") end)
      assert.has_error(function() l.with("y") end)
    end)
  end)

  it("writes one redacted logfmt line through the core", function()
    -- The child uses this process's search paths, so it loads the same
    -- core module busted was given with --cpath.
    local code = ("package.path = %q; package.cpath = %q; "
      .. "local log = require('justavps.log'); "
      .. "log.with({ request_id = 'r-9' }).info('hello', "
      .. "{ password = 'pw-123', port = 80 })"):format(package.path,
      package.cpath)
    local cmd = "luajit -e '" .. code:gsub("'", "'\\''") .. "' 2>&1"
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    assert.matches("level=info", out, 1, true)
    assert.matches("msg=hello", out, 1, true)
    assert.matches("request_id=r-9", out, 1, true)
    assert.matches("password=[redacted]", out, 1, true)
    assert.matches("port=80", out, 1, true)
    assert.not_matches("pw-123", out, 1, true)
  end)
end)
