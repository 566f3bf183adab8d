rockspec_format = "3.0"
package = "parallelize"
version = "scm-1"

-- `luarocks make` builds the working tree and ignores this; replace the
-- placeholder with the project's public repository when it has one.
source = {
  url = "git+https://example.invalid/parallelize.git",
}

description = {
  summary = "Run Lua calls in parallel worker processes (LuaJIT, C core)",
  detailed = [[
parallelize hands a list of callables ("executors") to a pool of worker
processes, each with its own fresh LuaJIT state; calling the pool queues a
call that runs in whichever worker is free, and results stream back into the
parent. Values cross the process boundary in a lossless binary codec
(parallelize.encode / parallelize.decode). Also installs pzlua, a LuaJIT
interpreter with parallelize built in.
]],
  license = "MIT",
}

-- LuaJIT reports itself to LuaRocks as Lua 5.1. The build needs LuaJIT's
-- headers and library (Debian: libluajit-5.1-dev, pkg-config).
dependencies = {
  "lua >= 5.1, < 5.2",
  "lua-cjson",
}

build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CC = "$(CC)",
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
  },
  install_target = "install",
  install_variables = {
    PREFIX = "$(PREFIX)",
    BINDIR = "$(BINDIR)",
    LIBDIR = "$(LIBDIR)",
    LUADIR = "$(LUADIR)",
  },
}
