local cli = require("justavps.cli")
local core = require("justavps.core")

-- The executable under test: JUSTAVPS_TEST_BIN, else justavps in
-- JV_BUILD_DIR (set by tools/test.sh), else in the build directory whose
-- core module busted was given with --cpath=DIR/lua/?.so.
local function find_binary()
  local bin = os.getenv("JUSTAVPS_TEST_BIN")
  if bin then
    return bin
  end
  local dir = os.getenv("JV_BUILD_DIR")
    or package.cpath:match("([^;]*)/lua/%?%.so")
    or "build"
  return dir .. "/justavps"
end

local BIN = find_binary()

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Runs the executable with args; returns exit status, stdout, stderr.
local function run(...)
  local parts = { shell_quote(BIN) }
  for _, a in ipairs({ ... }) do
    parts[#parts + 1] = shell_quote(a)
  end
  local err_path = os.tmpname()
  local p = assert(io.popen(table.concat(parts, " ") .. " 2>" .. err_path
    .. "; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  local f = assert(io.open(err_path))
  local err = f:read("*a")
  f:close()
  os.remove(err_path)
  local status = tonumber(out:match("exit=(%d+)\n$"))
  return status, out:gsub("exit=%d+\n$", ""), err
end

local function first_line(s)
  return s:match("^[^\n]*")
end


describe("justavps executable", function()
  setup(function()
    local f = io.open(BIN)
    assert(f, BIN .. " is missing: build it with cmake --build, or set "
      .. "JUSTAVPS_TEST_BIN")
    f:close()
  end)

  it("lists roles with summaries", function()
    local status, out = run("--help")
    assert.equal(0, status)
    assert.matches("usage: justavps ROLE", out, 1, true)
    assert.matches("\n  hello +%S", out)
    assert.matches("\n  dev +the whole stack on loopback", out)
    assert.matches("\n  serve +the HTTP host alone", out)
  end)

  it("prints the version", function()
    local status, out = run("--version")
    assert.equal(0, status)
    assert.equal("justavps " .. core.version .. "\n", out)
    assert.matches("^%d+%.%d+%.%d+$", core.version)
  end)

  it("lists a role's options with units and defaults", function()
    local status, out = run("hello", "--help")
    assert.equal(0, status)
    assert.matches("usage: justavps hello [options]", out, 1, true)
    assert.matches("--count INTEGER +number of greetings to log %(1 to 1000; "
      .. "default 1%)", out)
    assert.matches("--interval DURATION +pause between greetings "
      .. "%(seconds, or with a unit", out)
    assert.matches("--exit-status INTEGER", out, 1, true)
    assert.matches("--log-level STRING", out, 1, true)
  end)

  it("runs a role and returns its status", function()
    local status, _, err = run("hello", "--exit-status", "7")
    assert.equal(7, status)
    assert.matches("msg=hello", err, 1, true)
  end)

  it("writes a LuaJIT profile when JUSTAVPS_JIT_PROFILE names a file",
    function()
      local path = os.tmpname()
      os.remove(path)
      local p = assert(io.popen("JUSTAVPS_JIT_PROFILE=" .. shell_quote("f:"
        .. path) .. " " .. shell_quote(BIN) .. " hello --exit-status 3"
        .. " 2>/dev/null; echo \"exit=$?\""))
      local out = p:read("*a")
      p:close()
      assert.matches("exit=3", out, 1, true)
      local f = io.open(path)
      assert.is_truthy(f, "no profile written to " .. path)
      local report = f:read("*a")
      f:close()
      os.remove(path)
      -- A role this short may finish between two samples.
      assert.is_truthy(report:find("%d+%%") or report:find("No samples"),
        report)
    end)

  it("names JUSTAVPS_JIT_VERBOSE's file with %r and %p filled in",
    function()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. shell_quote(dir)) == 0)
      local p = assert(io.popen("JUSTAVPS_JIT_VERBOSE=" .. shell_quote(dir
        .. "/trace.%r.%p") .. " " .. shell_quote(BIN)
        .. " hello 2>/dev/null; echo \"exit=$?\""))
      local out = p:read("*a")
      p:close()
      assert.matches("exit=0", out, 1, true)
      local ls = assert(io.popen("ls " .. shell_quote(dir)))
      local names = ls:read("*a")
      ls:close()
      os.execute("rm -rf " .. shell_quote(dir))
      assert.matches("^trace%.hello%.%d+\n$", names)
    end)

  it("accepts --name=value and --name value", function()
    local status, _, err = run("hello", "--name=ada", "--count", "2",
      "--interval", "10ms")
    assert.equal(0, status)
    local greetings = 0
    for line in err:gmatch("[^\n]+") do
      if line:find("msg=hello", 1, true) then
        greetings = greetings + 1
        assert.matches("name=ada", line, 1, true)
        assert.matches("role=hello", line, 1, true)
      end
    end
    assert.equal(2, greetings)
  end)

  it("lists serve options with defaults", function()
    local status, out = run("serve", "--help")
    assert.equal(0, status)
    assert.matches("%-%-port", out)
    assert.matches("%-%-drain%-timeout", out)
  end)

  it("rejects a dev port out of range", function()
    for _, option in ipairs({ "--platform-port", "--edge-port",
        "--broker-port" }) do
      local status, _, err = run("dev", option, "0")
      assert.equal(2, status)
      assert.matches("^justavps: " .. option:gsub("%-", "%%-"), err)
    end
  end)

  it("rejects a serve port out of range", function()
    local status, _, err = run("serve", "--port", "70000")
    assert.equal(2, status)
    assert.matches("^justavps: %-%-port", err)
  end)

  it("honours --log-level", function()
    local status, _, err = run("hello", "--log-level", "warn")
    assert.equal(0, status)
    assert.not_matches("msg=hello", err, 1, true)
  end)

  local usage_errors = {
    { "no arguments", {}, "^usage: justavps ROLE" },
    { "an unknown role", { "nope" }, "^justavps: unknown role 'nope'" },
    { "an unknown global option", { "--nope" },
      "^justavps: unknown option %-%-nope" },
    { "an unknown option", { "hello", "--nope", "1" },
      "^justavps: unknown option %-%-nope" },
    { "a bad integer", { "hello", "--count", "abc" },
      '^justavps: %-%-count: expected integer between 1 and 1000, got "abc"' },
    { "an integer out of range", { "hello", "--count=0" },
      "^justavps: %-%-count: expected integer between 1 and 1000, got 0" },
    { "a bad duration", { "hello", "--interval", "soon" },
      '^justavps: %-%-interval: expected duration' },
    { "a missing value", { "hello", "--name" },
      "^justavps: option %-%-name requires a value" },
    { "an option as a value", { "hello", "--name", "--count" },
      "^justavps: option %-%-name requires a value" },
    { "a positional argument", { "hello", "extra" },
      "^justavps: unexpected argument 'extra'" },
    { "--no- on a non-boolean", { "hello", "--no-count" },
      "^justavps: unknown option %-%-no%-count" },
    { "a bad log level", { "hello", "--log-level", "loud" },
      "^justavps: %-%-log%-level: expected string one of" },
  }

  for _, case in ipairs(usage_errors) do
    it("exits 2 on " .. case[1], function()
      local status, out, err = run(unpack(case[2]))
      assert.equal(2, status)
      assert.equal("", out)
      assert.matches(case[3], first_line(err))
    end)
  end

  it("writes usage errors on one line", function()
    local _, _, err = run("hello", "--count", "x")
    assert.equal(1, select(2, err:gsub("\n", "")))
  end)
end)


describe("cli.parse", function()
  local role = {
    name = "fake",
    summary = "a role for parser specs",
    options = {
      { port = { type = "integer", between = { 0, 65535 }, default = 80 } },
      { ratio = { type = "number", default = 0.5 } },
      { verbose = { type = "boolean", default = false } },
      { tls = { type = "boolean", default = true } },
      { timeout = { type = "duration", default = "30s" } },
      { max_body = { type = "size", default = "64k" } },
      { domain = { type = "array", elements = { type = "string" } } },
      { token_file = { type = "string", required = true } },
    },
  }

  local function parse(...)
    return cli.parse(role, { ... })
  end

  it("applies defaults", function()
    local opts = assert(parse("--token-file", "/t"))
    assert.equal(80, opts.port)
    assert.equal(0.5, opts.ratio)
    assert.is_false(opts.verbose)
    assert.is_true(opts.tls)
    assert.equal(30, opts.timeout)
    assert.equal(65536, opts.max_body)
    assert.equal("info", opts.log_level)
  end)

  it("parses every type", function()
    local opts = assert(parse("--token-file=/t", "--port", "8080",
      "--ratio=0.25", "--verbose", "--no-tls", "--timeout", "1m30s",
      "--max-body", "16M", "--domain", "a", "--domain=b"))
    assert.equal(8080, opts.port)
    assert.equal(0.25, opts.ratio)
    assert.is_true(opts.verbose)
    assert.is_false(opts.tls)
    assert.equal(90, opts.timeout)
    assert.equal(16 * 1024 * 1024, opts.max_body)
    assert.same({ "a", "b" }, opts.domain)
  end)

  it("accepts --flag=false", function()
    local opts = assert(parse("--token-file=/t", "--verbose=false"))
    assert.is_false(opts.verbose)
  end)

  it("lets the last value win", function()
    local opts = assert(parse("--token-file=/t", "--port=1", "--port=2"))
    assert.equal(2, opts.port)
  end)

  it("returns help", function()
    local opts, kind = parse("--port", "1", "--help")
    assert.is_nil(opts)
    assert.equal("help", kind)
  end)

  local bad = {
    { "a missing required option", {}, "%-%-token%-file: required" },
    { "a bad boolean", { "--token-file=/t", "--verbose=maybe" },
      '%-%-verbose: expected boolean, got "maybe"' },
    { "a bad size", { "--token-file=/t", "--max-body", "lots" },
      "%-%-max%-body: expected size" },
    { "a fractional size", { "--token-file=/t", "--max-body", "1.5" },
      "%-%-max%-body: expected size" },
    { "a bad number", { "--token-file=/t", "--ratio", "half" },
      "%-%-ratio: expected number" },
    { "--no- with a value", { "--token-file=/t", "--no-tls=1" },
      "unknown option %-%-no%-tls" },
    { "a lone --", { "--" }, "unexpected argument '%-%-'" },
  }

  for _, case in ipairs(bad) do
    it("rejects " .. case[1], function()
      local opts, kind, message = parse(unpack(case[2]))
      assert.is_nil(opts)
      assert.equal("usage", kind)
      assert.matches(case[3], message)
    end)
  end

  it("reports every bad option", function()
    local _, _, message = parse("--port", "x", "--ratio", "y")
    assert.matches("%-%-port:", message)
    assert.matches("%-%-ratio:", message)
    assert.matches("%-%-token%-file:", message)
  end)

  it("shows sizes and durations in help", function()
    role.schema = nil
    local text = cli.role_help(role)
    assert.matches("--max-body SIZE", text, 1, true)
    assert.matches("default 64k", text, 1, true)
    assert.matches("default 30s", text, 1, true)
    assert.matches("--[no-]tls", text, 1, true)
    assert.matches("required", text, 1, true)
  end)
end)


describe("cli.run", function()
  local log = require("justavps.log")
  local lines, previous

  local function role(fn)
    return { name = "fake", options = {}, run = fn }
  end

  before_each(function()
    lines = {}
    previous = log.set_default(log.new({
      write = function(level, msg, fields)
        lines[#lines + 1] = { level = level, msg = msg, fields = fields }
      end,
      enabled = function() return true end,
      clock = function() return 0 end,
    }))
  end)

  after_each(function()
    log.set_default(previous)
    core.log.set_level("info")
    core.log.set_role("core")
  end)

  local statuses = {
    { "nil", nil, 0 },
    { "true", true, 0 },
    { "false", false, 1 },
    { "an integer", 3, 3 },
    { "an out-of-range integer", 300, 1 },
    { "a string", "ok", 1 },
  }

  for _, case in ipairs(statuses) do
    it("maps a result of " .. case[1], function()
      local status = cli.run(role(function() return case[2] end),
        { log_level = "alert" })
      assert.equal(case[3], status)
    end)
  end

  it("returns 1 and logs when run raises", function()
    local status = cli.run(role(function() error("boom") end),
      { log_level = "error" })
    assert.equal(1, status)
    assert.equal("alert", lines[1].level)
    assert.equal("role failed", lines[1].msg)
    assert.matches("cli_spec.lua:%d+: boom", lines[1].fields.error)
  end)
end)
