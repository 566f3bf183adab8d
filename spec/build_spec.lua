-- The Makefile and the rockspec, as a new machine meets them: nothing is
-- computed from installed packages while make reads the Makefile, the
-- targets that install packages build only after installing them, and
-- -Werror is for development builds, not for installs.
--
-- make runs with -n (print, do not run) from the top of the tree: nothing
-- is built or installed. A fake pkg-config first on PATH records each call.
local support = require "spec.support"

local quote = support.quote

--- Runs `make -n ARGS` with the fake pkg-config first on PATH; returns
-- make's output and status, and the list of pkg-config calls.
local function make_n(dir, args)
  local log = dir .. "/pkg-config.log"
  os.remove(log)
  local out, status = support.run(("PATH=%s:\"$PATH\" make --no-print-directory -n %s"):format(quote(dir), args))
  local calls = {}
  for call in (support.read(log) or ""):gmatch("[^\n]+") do calls[#calls + 1] = call end
  return out, status, calls
end

describe("the Makefile", function()
  local dir
  setup(function()
    dir = support.tmpdir()
    -- Answers as pkg-config would for LuaJIT installed under /fake.
    support.write(dir .. "/pkg-config", ([[#!/bin/sh
echo "$*" >> %s
case "$*" in
  *cflags-only-I*) echo "-I/fake/include/luajit-2.1 " ;;
  *--libs*) echo "-L/fake/lib -lluajit-5.1 " ;;
  *) exit 1 ;;
esac
]]):format(quote(dir .. "/pkg-config.log")))
    os.execute("chmod +x " .. quote(dir .. "/pkg-config"))
  end)
  teardown(function() support.rmdir(dir) end)

  it("runs no pkg-config while it is read, before deps could install LuaJIT", function()
    local out, status, calls = make_n(dir, "clean LUA_INCDIR=/nonexistent")
    assert.equal(0, status, out)
    assert.same({}, calls)
    out, status, calls = make_n(dir, "run LUA_INCDIR=/nonexistent")
    assert.equal(0, status, out)
    assert.same({}, calls, "pkg-config ran for a target that builds nothing itself")
  end)

  it("asks pkg-config once, when a recipe first needs LuaJIT, if LUA_INCDIR is not LuaJIT's", function()
    local out, status, calls = make_n(dir, "-B build/obj/core.o build/obj/frame.o build/pzlua LUA_INCDIR=/nonexistent")
    assert.equal(0, status, out)
    assert.same({ "--cflags-only-I luajit", "--libs luajit" }, calls)
    local _, compiles = out:gsub("%-I/fake/include/luajit%-2%.1 %-Isrc", "")
    assert.is_true(compiles >= 2, out)
    assert.matches("%-L/fake/lib %-lluajit%-5%.1", out)
  end)

  it("stops with what to do when LuaJIT's headers are nowhere", function()
    local out, status = support.run("PATH=/nonexistent-bin:\"$PATH\" PKG_CONFIG_LIBDIR=/nonexistent "
      .. "make --no-print-directory -n -B build/obj/core.o LUA_INCDIR=/nonexistent")
    assert.is_not.equal(0, status)
    assert.matches("LuaJIT's headers %(luajit%.h%) are neither in /nonexistent nor known to pkg%-config: "
      .. "`make deps` installs them", out)
  end)

  for _, target in ipairs({ "run", "test", "bench", "soak", "fuzz" }) do
    it(("make %s installs its packages, then builds in a second make"):format(target), function()
      local out, status = make_n(dir, target)
      assert.equal(0, status, out)
      local install = out:find("apt-get install", 1, true)
      local submake = out:find("\n[^\n]*make %-%-no%-print%-directory [^\n]*\n")
      assert.truthy(install, out)
      assert.truthy(submake, out)
      assert.is_true(install < submake, out)
    end)
  end

  it("installs as root directly and as a user through sudo, only what is missing", function()
    local out = make_n(dir, "deps-build")
    assert.matches("dpkg%-query %-W", out)
    assert.matches("if %[ %-n \"%$missing\" %]", out)
    assert.matches("%[ \"%$%(id %-u%)\" != 0 %]", out)
    assert.matches("SUDO=sudo", out)
  end)

  it("builds with -Werror for development, without it for make install", function()
    local out = make_n(dir, "-B build/obj/core.o")
    assert.matches(" %-Werror ", out)
    out = make_n(dir, "-B install PREFIX=/nonexistent")
    assert.matches("%-c %-o build/obj/core%.o", out)
    assert.falsy(out:find("-Werror", 1, true), out)
    out = make_n(dir, "-B build/obj/core.o WERROR=")
    assert.falsy(out:find("-Werror", 1, true), out)
  end)
end)

describe("the rockspec", function()
  local rockspec = {}
  setup(function()
    local chunk = assert(loadfile("parallelize-scm-1.rockspec"))
    setfenv(chunk, rockspec)
    chunk()
  end)

  it("builds without -Werror, for Linux, needing nothing but Lua 5.1 (LuaJIT) at run time", function()
    assert.equal("", rockspec.build.variables.WERROR)
    assert.same({ "linux" }, rockspec.supported_platforms)
    assert.same({ "lua >= 5.1, < 5.2" }, rockspec.dependencies)
  end)

  it("has a test section that runs busted under LuaJIT, fetching nothing", function()
    assert.equal("command", rockspec.test.type)
    assert.matches("^busted %-%-lua=luajit", rockspec.test.command)
    assert.is_nil(rockspec.test_dependencies)
  end)
end)
