-- luacheck configuration (`make lint`; tools/run-tests.sh runs it too).
std = "luajit"
max_line_length = 120
exclude_files = { "build/**", "lua_modules/**", ".luarocks/**" }

-- Specs run under busted.
files["spec"] = { std = "+busted" }
-- The soak test is a plain script, not a spec.
files["spec/soak"] = { std = "luajit" }
-- This file and the busted configuration are Lua too.
files[".luacheckrc"] = { globals = { "std", "max_line_length", "exclude_files", "files" } }
