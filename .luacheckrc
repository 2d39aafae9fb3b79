-- luacheck configuration. tools/test.sh runs `luacheck lua policies providers
-- spec` and counts the result as one check.
--
-- Line limits: 80 columns for the modules in lua/, policies/ and providers/,
-- the same width as the C core's .clang-format, so that one side-by-side
-- view fits both. Specs may use 100 because nested describe/it blocks and
-- literal request texts indent deep.
std = "luajit"
max_line_length = 80

exclude_files = {
  "build/",
  "build-*/",
  "var/",
}

files["spec/"] = {
  std = "+busted",
  max_line_length = 100,
}
