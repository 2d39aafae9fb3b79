-- The provisioning worker of a platform process: it runs the "provision"
-- and "delete" jobs of the jobs queue (justavps.provision.jobs) and
-- watches for machines that never send a heartbeat.
--
--   provision  SSH key pair, cloud-init user-data, the provider's
--              create_server, then the server id and address on the
--              machine row and the stage server_created. The daemon's
--              heartbeats move the machine on from there.
--   delete     the provider's delete_server (by server id, or by slug
--              when no create finished), then the stage deleted.
--   watchdog   a machine in server_created that has sent no heartbeat
--              heartbeat_deadline seconds after its server was created
--              moves to failed, with the reason in the event detail.
--
-- Any number of platform processes run workers on one database: the
-- queue hands each job to one worker, and the lease makes a job of a
-- killed process run again elsewhere or after a restart.
local core = require("justavps.core")
local db = require("justavps.db.db")
local json = require("justavps.json")
local log = require("justavps.log")
local providers = require("providers.init")

local ipairs = ipairs
local cloud_init = require("justavps.provision.cloud_init")
local sshkey = require("justavps.provision.sshkey")
local stages = require("justavps.provision.stages")
local jobs = require("justavps.provision.jobs")

local pcall = pcall
local xpcall = xpcall
local pairs = pairs
local rawget = rawget
local tostring = tostring
local traceback = debug.traceback
local format = string.format
local srep = string.rep
local max = math.max
local min = math.min

local _M = {}

_M.KINDS = { "provision", "delete" }

-- Provider error codes that another attempt cannot fix: the job becomes
-- dead at once and the machine fails.
local PERMANENT = {
  invalid_request = true,
  unauthorized = true,
  quota_exceeded = true,
  uniqueness_conflict = true,
  not_found = true,
}

-- The checksum of the placeholder daemon_sha256, which no real download
-- matches.
local PLACEHOLDER_SHA256 = srep("0", 64)

-- The running worker: { conf, worker_id, platform_url, drivers, modules,
-- running }, or nil.
local current


-- A failure of one job step: message, code, and whether a later attempt
-- may succeed.
local function failure(message, code, permanent)
  return { message = tostring(message), code = code,
    permanent = permanent == true }
end


local function provider_failure(what, err, code)
  return failure(what .. ": " .. tostring(err), code, PERMANENT[code])
end


-- Returns the driver for provider name, built once per worker from
-- provision.providers.NAME, or nil, failure.
local function driver_for(w, name)
  if w.drivers[name] then
    return w.drivers[name], w.modules[name]
  end
  local module, err = providers.get(name)
  if not module then
    return nil, failure(err, "not_found", true)
  end
  -- rawget: the validated record raises on a key it does not declare.
  local provider_conf = rawget(w.conf.providers, name)
  if provider_conf == nil then
    return nil, failure("provider " .. name .. " has no configuration in "
      .. "provision.providers", "invalid_request", true)
  end
  -- A plain copy, because the validated config raises on reads of keys
  -- it does not declare, and the provider validates the fields again.
  local driver_conf = {}
  for k, v in pairs(provider_conf) do
    driver_conf[k] = v
  end
  local driver, derr, dcode = providers.new(name, driver_conf)
  if not driver then
    return nil, failure("provider " .. name .. ": " .. tostring(derr),
      dcode, true)
  end
  w.drivers[name] = driver
  w.modules[name] = module
  return driver, module
end


-- Loads machine id with SQL NULLs as nil: a NULL column arrives as a
-- null value that is true in Lua, and `machine.provider_server_id or
-- machine.slug` must fall back to the slug for a server never created.
local function load_machine(id)
  local machine, err, code = db.one("SELECT id, slug, account_id, token, "
    .. "provider, region, server_type, stage::text AS stage, "
    .. "provider_server_id, host(ip) AS ip FROM machines WHERE id = $1",
    { id })
  if type(machine) == "table" then
    for key, value in pairs(machine) do
      if value == core.pg.null then
        machine[key] = nil
      end
    end
  end
  return machine, err, code
end


-- Builds the cloud-init user-data of machine, with a new SSH key pair.
-- Returns user_data, public_key, or nil, failure.
local function build_user_data(w, machine, module)
  local conf = w.conf
  if module.downloads_daemon ~= false
      and conf.daemon_sha256 == PLACEHOLDER_SHA256 then
    return nil, failure("provision.daemon_url and provision.daemon_sha256 "
      .. "must name the daemon release for provider " .. machine.provider,
      "invalid_request", true)
  end

  local key, kerr, kcode = sshkey.generate({
    comment = "justavps-" .. machine.slug })
  if not key then
    return nil, failure("SSH key generation failed: " .. tostring(kerr),
      kcode)
  end

  local cidrs = {}
  for i = 1, #conf.broker_cidrs do
    cidrs[i] = conf.broker_cidrs[i]
  end
  local user_data, err, code = cloud_init.user_data({
    slug = machine.slug,
    daemon_url = conf.daemon_url,
    daemon_sha256 = conf.daemon_sha256,
    daemon_config = {
      slug = machine.slug,
      token = machine.token,
      platform_url = w.platform_url,
      heartbeat_interval = conf.daemon_heartbeat_interval,
      update = { installed_path = cloud_init.DAEMON_PATH },
    },
    ssh_public_keys = { key.public_key },
    broker_cidrs = cidrs,
  })
  if not user_data then
    return nil, failure("cloud-init user-data: " .. tostring(err), code,
      true)
  end
  return user_data, key.public_key
end


-- Records the created server on the machine and moves it to
-- server_created. A machine that a fast daemon already moved further
-- keeps its stage. Returns the stage the machine is in.
local function record_server(tx, machine, server)
  local row, err, code = tx:one(
    "UPDATE machines SET provider_server_id = $2, ip = $3::inet "
      .. "WHERE id = $1 RETURNING stage::text AS stage",
    { machine.id, server.id, server.ipv4, n = 3 })
  if not row then
    return nil, err, code
  end
  if row.stage ~= "server_creating" then
    return row.stage
  end
  local event, terr, tcode = stages.transition(tx, machine,
    "server_created", { source = "worker",
      provider_server_id = server.id, ip = server.ipv4 })
  if not event then
    return nil, terr, tcode
  end
  return "server_created"
end



-- Returns the other regions to try, in order, when the machine's region
-- has no capacity for its server type (provision.fallback_regions).
local function fallbacks_for(w, machine)
  local list = {}
  for _, region in ipairs(w.conf.fallback_regions or {}) do
    if region ~= machine.region then
      list[#list + 1] = { region = region,
        server_type = machine.server_type }
    end
  end
  return list
end


-- Records a provider's progress (a create attempt, a region without
-- capacity, an SSH key reused) as a machine event at the machine's
-- current stage, so the user sees each fallback. A failure to record is
-- logged and does not stop the create.
local function record_provider_event(machine, event)
  if type(event) ~= "table" or type(event.type) ~= "string" then
    return
  end
  local detail = { source = "provider", kind = event.type,
    attempt = event.attempt, region = event.region,
    server_type = event.server_type,
    message = type(event.message) == "string" and event.message:sub(1, 300)
      or nil }
  local _, err, code = db.query(
    "INSERT INTO machine_events (machine_id, stage, detail) "
      .. "SELECT id, stage, $2::jsonb FROM machines WHERE id = $1",
    { machine.id, json.encode(detail) })
  if code then
    log.warn("provider event not recorded", { slug = machine.slug,
      event = event.type, error = err, code = code })
  end
end

local function run_provision(w, job, machine)
  if machine.stage ~= "server_creating" then
    log.info("provision job skipped", { job_id = job.id,
      slug = machine.slug, stage = machine.stage })
    return true
  end
  local driver, module = driver_for(w, machine.provider)
  if not driver then
    return nil, module
  end
  local user_data, public_key = build_user_data(w, machine, module)
  if not user_data then
    return nil, public_key
  end

  local server, err, code = driver:create_server({
    slug = machine.slug, name = machine.slug, region = machine.region,
    server_type = machine.server_type, image = w.conf.image,
    ssh_key = { name = "justavps-" .. machine.slug,
      public_key = public_key },
    user_data = user_data,
    labels = { ["justavps-account"] = machine.account_id },
    fallbacks = fallbacks_for(w, machine),
    on_event = function(event)
      record_provider_event(machine, event)
    end,
  })
  if not server then
    return nil, provider_failure("create_server", err, code)
  end
  log.info("server created", { job_id = job.id, slug = machine.slug,
    provider = machine.provider, provider_server_id = server.id,
    ip = server.ipv4 })

  local stage, serr, scode = db.tx(record_server, machine, server)
  if not stage then
    return nil, failure("recording the server failed: " .. tostring(serr),
      scode)
  end
  -- A delete requested while the create ran may have found no server to
  -- delete, so the server just made is deleted here.
  if stage == "deleting" or stage == "deleted" then
    log.info("deleting a server created after its delete request",
      { slug = machine.slug, provider_server_id = server.id })
    local ok, derr, dcode = driver:delete_server(server.id)
    if not ok then
      return nil, provider_failure("delete_server", derr, dcode)
    end
  end
  return true
end


local function run_delete(w, job, machine)
  if machine.stage == "deleted" then
    return true
  end
  local driver = driver_for(w, machine.provider)
  local result, err, code
  if driver then
    result, err, code = driver:delete_server(machine.provider_server_id
      or machine.slug)
    if not result then
      return nil, provider_failure("delete_server", err, code)
    end
  end
  local event, terr, tcode = db.tx(function(tx)
    return stages.transition(tx, machine, "deleted", { source = "worker",
      provider_server_id = machine.provider_server_id })
  end)
  if not event and tcode ~= "invalid_transition" then
    return nil, failure("recording the deletion failed: " .. tostring(terr),
      tcode)
  end
  log.info("machine deleted", { job_id = job.id, slug = machine.slug,
    provider = machine.provider })
  return true
end


-- Moves machine to failed with reason, unless it is already failed,
-- deleting or deleted.
local function fail_machine(machine, reason, fields)
  local detail = { source = "worker", reason = reason }
  for k, v in pairs(fields or {}) do
    detail[k] = v
  end
  local event, err, code = db.tx(function(tx)
    local row, rerr, rcode = tx:one("SELECT stage::text AS stage FROM "
      .. "machines WHERE id = $1 FOR UPDATE", { machine.id })
    if not row then
      return nil, rerr, rcode
    end
    if not stages.allowed(row.stage, "failed") or row.stage == "deleting"
    then
      return false
    end
    return stages.transition(tx, machine, "failed", detail)
  end)
  if event == nil then
    log.err("marking the machine failed did not work", { slug = machine.slug,
      reason = reason, error = err, code = code })
  elseif event then
    log.warn("machine failed", { slug = machine.slug, reason = reason })
  end
end


local RUNNERS = { provision = run_provision, delete = run_delete }


-- Runs one claimed job while a timer renews its lease, then records the
-- outcome.
local function run_job(w, job)
  local conf = w.conf
  local lost = false
  local renew = core.timer(conf.lease / 3, function()
    core.spawn(function()
      local held = jobs.renew(job, w.worker_id, conf.lease)
      if held == false then
        lost = true
        log.warn("job lease lost", { job_id = job.id, kind = job.kind })
      end
    end)
  end, conf.lease / 3)

  local machine, merr, mcode = load_machine(job.machine_id)
  local ok, problem
  if not machine then
    if mcode == "not_found" then
      ok = true
    else
      problem = failure("loading the machine failed: " .. tostring(merr),
        mcode)
    end
  else
    local runner = RUNNERS[job.kind]
    local success, result, err = xpcall(runner, traceback, w, job, machine)
    if not success then
      problem = failure("job raised an error: " .. tostring(result),
        "internal")
    else
      ok, problem = result, err
    end
  end
  renew:stop()

  if lost then
    return
  end
  if ok then
    jobs.complete(job, w.worker_id)
    log.info("job done", { job_id = job.id, kind = job.kind,
      slug = machine and machine.slug, attempts = job.attempts })
    return
  end

  local state, ferr = jobs.fail(job, w.worker_id, problem.message, {
    retry = not problem.permanent, max_attempts = conf.max_attempts,
    backoff_base = conf.backoff_base, backoff_max = conf.backoff_max })
  log.warn("job failed", { job_id = job.id, kind = job.kind,
    slug = machine and machine.slug, attempts = job.attempts,
    error = problem.message, code = problem.code,
    state = state or ferr })
  if state == "dead" and machine then
    fail_machine(machine, job.kind .. " failed: " .. problem.message,
      { job_id = job.id, code = problem.code })
  end
end


-- Marks machines failed that sent no heartbeat within heartbeat_deadline
-- of their server_created event, and requeues jobs whose lease expired.
local function watch(w)
  local conf = w.conf
  local reclaimed, rerr, rcode = jobs.reclaim_expired(conf.max_attempts)
  if not reclaimed then
    log.warn("reclaiming expired jobs failed", { error = rerr,
      code = rcode })
  else
    for i = 1, #reclaimed do
      local job = reclaimed[i]
      log.warn("job lease expired", { job_id = job.id, kind = job.kind,
        previous_worker = job.previous_worker, state = job.state })
    end
  end

  local rows, err, code = db.rows(
    "SELECT m.id, m.slug FROM machines m WHERE m.stage = 'server_created' "
      .. "AND m.last_seen_at IS NULL AND m.deleted_at IS NULL "
      .. "AND EXISTS (SELECT 1 FROM machine_events e "
      .. "WHERE e.machine_id = m.id AND e.stage = 'server_created' "
      .. "AND e.created_at < now() - $1::float8 * interval '1 second') "
      .. "LIMIT 100",
    { conf.heartbeat_deadline })
  if not rows then
    log.warn("heartbeat deadline check failed", { error = err,
      code = code })
    return
  end
  for i = 1, #rows do
    local machine = rows[i]
    local event, terr, tcode = db.tx(function(tx)
      -- Checked again under the row lock: a heartbeat may have arrived.
      local row, lerr, lcode = tx:one("SELECT stage::text AS stage, "
        .. "last_seen_at IS NULL AS unseen FROM machines WHERE id = $1 "
        .. "FOR UPDATE", { machine.id })
      if not row then
        return nil, lerr, lcode
      end
      if row.stage ~= "server_created" or not row.unseen then
        return false
      end
      return stages.transition(tx, machine, "failed", { source = "worker",
        reason = format("no heartbeat within %g seconds of server "
          .. "creation", conf.heartbeat_deadline),
        heartbeat_deadline = conf.heartbeat_deadline })
    end)
    if event then
      log.warn("machine failed: no first heartbeat", { slug = machine.slug,
        heartbeat_deadline = conf.heartbeat_deadline })
    elseif event == nil then
      log.warn("marking a silent machine failed did not work",
        { slug = machine.slug, error = terr, code = tcode })
    end
  end
end


-- Sleeps between polls. A stopped worker's loops end after their pause.
local function pause(_, seconds)
  core.sleep(seconds)
end


local function job_loop(w, n)
  while w.running do
    local job, err, code = jobs.claim(w.worker_id, w.conf.lease, _M.KINDS)
    if job then
      log.info("job claimed", { job_id = job.id, kind = job.kind,
        worker = w.worker_id, slot = n, attempts = job.attempts })
      run_job(w, job)
    else
      if job == nil then
        log.warn("claiming a job failed", { error = err, code = code })
      end
      pause(w, w.conf.poll_interval)
    end
  end
end


local function watch_loop(w)
  while w.running do
    local ok, err = pcall(watch, w)
    if not ok then
      log.err("provisioning watchdog raised an error", { error = err })
    end
    pause(w, min(w.conf.poll_interval * 5, max(1, w.conf.lease / 2)))
  end
end


-- Starts the worker for the platform config conf (its provision record
-- and listen address). opts.port is the port the API listens on, for the
-- daemons' platform_url when provision.platform_url is empty. Does
-- nothing when provision.enabled is false.
function _M.start(conf, opts)
  opts = opts or {}
  local pconf = conf.provision
  if not pconf.enabled then
    log.info("provisioning worker disabled")
    return
  end
  if current then
    _M.stop()
  end

  local platform_url = pconf.platform_url
  if platform_url == "" then
    local host = conf.listen.host
    if host == "0.0.0.0" then
      host = "127.0.0.1"
    end
    platform_url = "http://" .. host .. ":"
      .. tostring(opts.port or conf.listen.port)
  end

  local worker_id = pconf.worker_id
  if worker_id == "" then
    worker_id = format("platform-%d-%d", core.proc.getpid(),
      core.time() * 1000)
  end

  local w = {
    conf = pconf,
    worker_id = worker_id,
    platform_url = platform_url,
    drivers = {},
    modules = {},
    running = true,
  }
  current = w
  for n = 1, pconf.concurrency do
    core.spawn(job_loop, w, n)
  end
  core.spawn(watch_loop, w)
  log.info("provisioning worker started", { worker = worker_id,
    concurrency = pconf.concurrency, platform_url = platform_url })
end


-- Stops claiming jobs. A job that is running when the process exits keeps
-- its lease until it expires, then another worker runs it again.
function _M.stop()
  local w = current
  if not w then
    return
  end
  current = nil
  w.running = false
  log.info("provisioning worker stopped", { worker = w.worker_id })
end

return _M
