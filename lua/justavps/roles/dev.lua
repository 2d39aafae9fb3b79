-- justavps dev: the whole stack on one host, on loopback only. In order:
--   1. a private PostgreSQL cluster under DIR/pg, migrated (dev.postgres);
--   2. a development CA, the edge's and broker's certificates, secrets
--      and the role configs under DIR (dev.configs);
--   3. platform, broker and edge as child processes that are restarted
--      when they exit (dev.supervisor);
--   4. the daemons of local machines from an earlier run, started again;
--   5. a demo account, API key and machine made through the API
--      (dev.bootstrap);
--   6. DIR/stack.json (mode 0600) and a summary on stdout;
--   7. checks that restart PostgreSQL and machine daemons when they stop
--      (dev.watch).
-- SIGINT or SIGTERM stops everything in the reverse order, and the next
-- start reuses the data.
local core = require("justavps.core")
local json = require("justavps.json")
local log = require("justavps.log")
local migrate = require("justavps.db.migrate")
local local_provider = require("providers.local")
local files = require("justavps.dev.files")
local postgres = require("justavps.dev.postgres")
local configs = require("justavps.dev.configs")
local supervisor = require("justavps.dev.supervisor")
local bootstrap = require("justavps.dev.bootstrap")
local summary = require("justavps.dev.summary")
local watch = require("justavps.dev.watch")

local ipairs = ipairs
local rawget = rawget
local tostring = tostring
local floor = math.floor

local _M = {}

_M.summary = "the whole stack on loopback: Postgres, platform, edge, "
  .. "broker and a local machine"

_M.options = {
  { dir = { type = "string", default = "var/dev", len_min = 1,
    description = "directory of the stack's data, configs, logs and "
      .. "stack.json; reused on the next start" } },
  { domain = { type = "string", default = "justavps.localhost",
    match = "^[a-z0-9][a-z0-9.-]*[a-z0-9]$",
    description = "domain of the machine URLs; names under .localhost "
      .. "resolve to loopback without DNS" } },
  { platform_port = { type = "integer", default = 8080,
    between = { 1, 65535 }, description = "port of the platform API on "
      .. "127.0.0.1" } },
  { edge_port = { type = "integer", default = 8443, between = { 1, 65535 },
    description = "port of the edge (HTTPS) on 127.0.0.1" } },
  { broker_port = { type = "integer", default = 8444,
    between = { 1, 65535 }, description = "port of the broker (HTTPS) on "
      .. "127.0.0.1" } },
  { first_address = { type = "integer", default = 2, between = { 2, 254 },
    description = "last byte of the first 127.0.0.x address given to "
      .. "local machines" } },
  { machine = { type = "boolean", default = true,
    description = "create the demo machine (or reuse the last one)" } },
  { heartbeat_interval = { type = "duration", default = 5,
    between = { 1, 3600 },
    description = "seconds between the heartbeats of local machines" } },
  { ready_timeout = { type = "duration", default = 120,
    between = { 1, 3600 },
    description = "seconds each start step may take" } },
  { stop_timeout = { type = "duration", default = 10, between = { 0, 600 },
    description = "seconds each role may take to stop before SIGKILL" } },
  { access_log = { type = "boolean", default = true,
    description = "log one line per request in the roles' log files" } },
}


-- Returns the absolute path of path, which must exist.
local function realpath(path)
  local res = files.run("realpath", { "-e", "--", path })
  if not res or res.status ~= 0 then
    return nil, "realpath " .. path .. " failed"
  end
  return (res.stdout:gsub("\n$", ""))
end


-- Starts the daemons of the local machines in DIR/machines whose process
-- is not running, such as those the last `justavps dev` stopped.
local function start_machines(driver)
  local ok, err = driver:resolve()
  if not ok then
    return nil, err
  end
  for _, slug in ipairs(driver:list_machines()) do
    local _, alive = driver:daemon_pid(slug)
    if not alive then
      local pid, serr = driver:start_daemon(slug)
      if pid then
        log.info("machine daemon started again", { slug = slug, pid = pid })
      else
        log.err("cannot start a machine daemon", { slug = slug,
          error = serr })
      end
    end
  end
  return true
end


local function stop_machines(driver)
  for _, slug in ipairs(driver:list_machines()) do
    driver:stop_daemon(slug)
    driver:stop_machine_processes(slug)
  end
end


-- Returns true when nothing listens on each of the stack's ports, else
-- nil, message naming the port and its option.
local function check_ports(opts)
  for _, entry in ipairs({
      { "platform", opts.platform_port },
      { "edge", opts.edge_port },
      { "broker", opts.broker_port } }) do
    local listener = core.tcp.listen({ host = "127.0.0.1", port = entry[2],
      on_accept = function(sock)
        sock:close()
      end })
    if not listener then
      return nil, "port " .. entry[2] .. " on 127.0.0.1 for the "
        .. entry[1] .. " is in use; stop what listens there or pass --"
        .. entry[1] .. "-port"
    end
    listener:close()
  end
  return true
end


-- Writes DIR/stack.json. Returns the stack table, or nil, message.
local function write_stack(stack, demo)
  local out = {
    platform_url = stack.platform_url,
    edge_url = stack.edge_url,
    domain = stack.domain,
    ca_file = stack.ca_file,
    api_key = demo.api_key,
    broker_url = stack.broker_url,
    broker_id = stack.broker_id,
    broker_secret = stack.secrets.broker_secret,
    jwt_secret = stack.secrets.jwt_secret,
    demo_email = bootstrap.DEMO_EMAIL,
    demo_password = stack.secrets.demo_password,
    logs = stack.dir .. "/log",
    database = stack.conninfo,
  }
  local machine = demo.machine
  if machine then
    local conf = bootstrap.local_machine(stack.machines_dir, machine.slug)
      or {}
    local internal = conf.internal or {}
    out.machine = {
      slug = machine.slug,
      ip = machine.ip,
      daemon_port = configs.DAEMON_PORT,
      url = "https://" .. machine.slug .. "." .. stack.domain .. ":"
        .. stack.edge_port,
      internal_url = internal.host and ("http://" .. internal.host .. ":"
        .. internal.port) or nil,
      token = conf.token,
    }
  end
  local path = stack.dir .. "/stack.json"
  local ok, err = files.write_private(path, json.encode(out) .. "\n")
  if not ok then
    return nil, "cannot write " .. path .. ": " .. tostring(err)
  end
  return out
end


-- Runs steps 1 to 6. Returns the objects to stop, and nil or an error
-- message; stops early when state.stop_requested becomes true.
local function start(opts, state)
  -- The option's pattern cannot see an empty label such as "a..b".
  if opts.domain:find("%.[.-]") or opts.domain:find("%-%.") then
    return "invalid --domain " .. opts.domain .. ": each label between "
      .. "dots must be letters, digits and inner hyphens"
  end
  local ok, err = files.mkdir(opts.dir)
  if not ok then
    return err
  end
  opts.dir, err = realpath(opts.dir)
  if not opts.dir then
    return err
  end
  local code
  ok, err, code = files.lock(opts.dir .. "/dev.lock")
  if not ok then
    if code == "locked" then
      return "another justavps dev is running on " .. opts.dir
        .. "; stop it first, or pass another --dir"
    end
    return err
  end

  -- Roles that a killed run left still hold the ports. The lock proves
  -- that run is gone, so they can be stopped.
  supervisor.stop_leftovers(opts.dir, opts.dir .. "/run",
    { "edge", "broker", "platform" })

  -- Every port must be free before anything starts: a client of a port
  -- taken by another program would send it the demo credentials.
  ok, err = check_ports(opts)
  if not ok then
    return err
  end

  if files.getuid() == 0 then
    log.warn("running as root: local machines run commands as root, and "
      .. "every user of this host can reach them on 127.0.0.x; use a "
      .. "machine you do not share")
  end

  local pg
  pg, err = postgres.new(opts.dir)
  if not pg then
    return err
  end
  -- Set before the start, so that a failure after it stops the server.
  state.pg = pg
  local conninfo
  conninfo, err = pg:start()
  if not conninfo then
    return err
  end
  local result, merr = migrate.run({ conninfo = conninfo,
    dir = (rawget(_G, "JUSTAVPS_ROOT") or ".") .. "/sql" })
  if not result then
    return "migrations failed: " .. tostring(merr)
  end
  if state.stop_requested then
    return nil
  end

  local stack
  stack, err = configs.write(opts, conninfo)
  if not stack then
    return err
  end
  stack.conninfo = conninfo
  stack.edge_port = opts.edge_port

  local binary
  binary, err = realpath("/proc/" .. core.proc.getpid() .. "/exe")
  if not binary then
    return err
  end
  local sup
  sup, err = supervisor.new({ binary = binary, log_dir = opts.dir .. "/log",
    run_dir = opts.dir .. "/run", access_log = opts.access_log })
  if not sup then
    return err
  end
  state.supervisor = sup
  for _, role in ipairs({
      { "platform", opts.platform_port },
      { "broker", opts.broker_port },
      { "edge", opts.edge_port } }) do
    ok, err = sup:start(role[1], stack.configs[role[1]], role[2],
      opts.ready_timeout)
    if not ok then
      return err
    end
    if state.stop_requested then
      return nil
    end
  end

  local driver
  driver, err = local_provider.new({ root_dir = stack.machines_dir,
    address_first = opts.first_address, public_port = configs.DAEMON_PORT })
  if not driver then
    return err
  end
  state.driver = driver
  ok, err = start_machines(driver)
  if not ok then
    return err
  end

  local demo
  demo, err = bootstrap.run("127.0.0.1", opts.platform_port, stack.secrets,
    json.decode(files.read(opts.dir .. "/stack.json") or "null"),
    { machine = opts.machine, timeout = opts.ready_timeout })
  if not demo then
    return err
  end

  local out
  out, err = write_stack(stack, demo)
  if not out then
    return err
  end
  io.stdout:write(summary.format(out, opts.dir))
  io.stdout:flush()
  state.watch = watch.start(pg, driver)
  log.info("justavps dev is ready", { platform = out.platform_url,
    edge = out.edge_url,
    seconds = floor((core.now() - state.started) * 1000 + 0.5) / 1000 })
  return nil
end


-- Stops what start() started, newest first.
local function stop(opts, state)
  if state.watch then
    state.watch.stop()
  end
  if state.supervisor then
    state.supervisor:stop_all(opts.stop_timeout)
  end
  if state.driver then
    stop_machines(state.driver)
  end
  if state.pg then
    state.pg:stop()
  end
end


function _M.run(opts)
  local state = { started = core.now(), stop_requested = false }
  local stop_signal = core.waiter()
  local status = 0

  local function on_signal(name)
    if not state.stop_requested then
      log.info("stopping", { signal = name })
    end
    state.stop_requested = true
    stop_signal:wake()
  end
  local handles = { core.signal.on("SIGINT", on_signal),
    core.signal.on("SIGTERM", on_signal) }

  core.spawn(function()
    local err = start(opts, state)
    if err then
      log.alert("justavps dev could not start", { error = err })
      status = 1
    elseif not state.stop_requested then
      stop_signal:wait()
    end
    stop(opts, state)
    for _, h in ipairs(handles) do
      h:stop()
    end
    log.info("justavps dev stopped")
  end)

  core.run()
  return status
end


return _M
