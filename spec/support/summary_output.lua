-- Busted output handler for tools/test.sh: prints busted's usual terminal
-- output (utfTerminal) and, at the end of the suite, writes the counts to
-- the file named by JV_TEST_SUMMARY as one line: "passed failed pending".
-- Errors (a test that raised, or a spec file that failed to load) count as
-- failed.
--   busted -o spec/support/summary_output.lua
local io_open = io.open
local os_getenv = os.getenv
local string_format = string.format


return function(options)
  local busted = require("busted")
  local handler = require("busted.outputHandlers.utfTerminal")(options)
  local path = os_getenv("JV_TEST_SUMMARY")

  local function write_summary()
    if not path then
      return nil, true
    end

    local file, err = io_open(path, "w")
    if not file then
      io.stderr:write("summary_output: failed to write ", path, ": ", err, "\n")
      return nil, true
    end

    file:write(string_format("%d %d %d\n", handler.successesCount,
                             handler.failuresCount + handler.errorsCount,
                             handler.pendingsCount))
    file:close()
    return nil, true
  end

  busted.subscribe({ "suite", "end" }, write_summary)
  return handler
end
