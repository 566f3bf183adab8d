rockspec_format = "3.0"
package = "parallelize"
version = "scm-1"

-- `luarocks make` builds the working tree and ignores this; replace the
-- placeholder with the project's public repository when it has one.
source = {
  url = "git+https://example.invalid/parallelize.git",
}

description = {
  summary = "Parallel task runtime for LuaJIT: calls run in forked worker processes",
  detailed = [[
parallelize runs Lua calls in parallel worker processes. A script hands a
list of callables ("executors") to Parallelize; each lives in a forked worker
process with a fresh LuaJIT state of its own; calling the returned pool
queues a call that runs in whichever worker is free, while a C I/O thread in
the parent streams results back. Errors in executors are recorded with their
call's arguments, a dying worker loses no call, and nothing hangs. Values
cross between processes in a lossless binary codec (parallelize.encode,
parallelize.decode). Also installs pzlua, LuaJIT's command line with
parallelize built in. Needs LuaJIT 2.1 on Linux.
]],
  license = "MIT",
  labels = { "concurrency", "parallel", "multiprocessing", "luajit" },
}

supported_platforms = { "linux" }

-- LuaJIT reports itself to LuaRocks as Lua 5.1; the module needs LuaJIT 2.1
-- itself (its headers and library: Debian's libluajit-5.1-dev, pkg-config)
-- and refuses to load anywhere else. Nothing else is used at run time.
dependencies = {
  "lua >= 5.1, < 5.2",
}

build = {
  type = "make",
  build_target = "all",
  -- Given to both `make all` and `make install`. WERROR is empty: an
  -- install must not fail on a warning that only a newer compiler gives.
  variables = {
    CC = "$(CC)",
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    WERROR = "",
  },
  install_target = "install",
  install_variables = {
    PREFIX = "$(PREFIX)",
    BINDIR = "$(BINDIR)",
    LIBDIR = "$(LIBDIR)",
    LUADIR = "$(LUADIR)",
  },
}

-- `luarocks test` (after `luarocks make`, which builds build/) runs the
-- specs with the busted found on PATH, under LuaJIT: busted's --lua runs it
-- again under that interpreter, whatever Lua its script names. Nothing is
-- fetched, so Debian's busted works offline. Arguments are passed on to
-- busted (`luarocks test -- spec/pool_spec.lua`).
test = {
  type = "command",
  command = "busted --lua=luajit",
}
