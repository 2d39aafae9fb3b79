-- A stand-in role that logs a greeting and exits, so the executable, the
-- option parser and the loop can be run end to end before any real role
-- exists.
local core = require("justavps.core")
local log = require("justavps.log")

local _M = {}

_M.summary = "logs a greeting and exits"

_M.options = {
  { name = { type = "string", default = "world", len_min = 1,
    description = "who to greet" } },
  { count = { type = "integer", default = 1, between = { 1, 1000 },
    description = "number of greetings to log" } },
  { interval = { type = "duration", default = 0, between = { 0, 3600 },
    description = "pause between greetings" } },
  { exit_status = { type = "integer", default = 0, between = { 0, 125 },
    description = "exit status to return, for testing the command line" } },
}


function _M.run(opts)
  local done = false

  core.spawn(function()
    for i = 1, opts.count do
      if i > 1 and opts.interval > 0 then
        core.sleep(opts.interval)
      end
      log.info("hello", { name = opts.name, greeting = i })
    end
    done = true
  end)

  core.run()

  if not done then
    log.alert("hello: loop stopped before the greetings finished")
    return 1
  end

  return opts.exit_status
end


return _M
