-- What a user sees when a call is wrong: messages that name the type of
-- what was given, list what is valid, point at the user's line and say how
-- to call a method; and, from an interpreter that is not LuaJIT 2.1, one
-- line saying what the module needs.
local parallelize = require "parallelize"
local support = require "spec.support"

local Parallelize = parallelize.Parallelize

local THIS_FILE = debug.getinfo(1, "S").short_src

--- Calls fn (whose error must come from the line `line` of this file) and
-- returns the message without that position; fails when fn does not raise
-- or the position is another.
local function message_of(fn, line)
  local ok, err = pcall(fn)
  assert.is_false(ok, "no error")
  assert.equal("string", type(err))
  local where, msg = err:match("^([^:]+:%d+): (.*)$")
  assert.equal(THIS_FILE .. ":" .. line, where, err)
  return msg
end

local function line() return debug.getinfo(2, "l").currentline end

local function noop() end

describe("messages", function()
  describe("an option of the wrong type", function()
    it("names the type and shows the value", function()
      local l = line() + 1
      local msg = message_of(function() Parallelize({ noop }, { max_deaths = "3" }) end, l)
      assert.equal('Parallelize: option max_deaths must be an integer from 1 to 255 (got a string "3")', msg)
      l = line() + 1
      msg = message_of(function() Parallelize({ noop }, { respawn = 1 }) end, l)
      assert.equal("Parallelize: option respawn must be a boolean (got a number 1)", msg)
      l = line() + 1
      msg = message_of(function() Parallelize({ noop }, { window = {} }) end, l)
      assert.equal("Parallelize: option window must be a number from 0 to 3600 (got a table)", msg)
      l = line() + 1
      msg = message_of(function() Parallelize({ noop }, "fast") end, l)
      assert.equal('Parallelize: options must be a table (got a string "fast")', msg)
    end)

    it("shows a number out of range as it is", function()
      local l = line() + 1
      local msg = message_of(function() Parallelize({ noop }, { max_deaths = 0 }) end, l)
      assert.equal("Parallelize: option max_deaths must be an integer from 1 to 255 (got 0)", msg)
    end)
  end)

  it("an unknown option lists the valid ones", function()
    local names = {}
    for name in pairs(require("parallelize.options").OPTIONS) do names[#names + 1] = name end
    table.sort(names)
    assert.is_true(#names >= 8)
    local l = line() + 1
    local msg = message_of(function() Parallelize({ noop }, { max_death = 3 }) end, l)
    assert.equal("Parallelize: unknown option 'max_death' (the options are " .. table.concat(names, ", ") .. ")", msg)
    l = line() + 1
    msg = message_of(function() Parallelize({ noop }, { 3 }) end, l)
    assert.matches("^Parallelize: unknown option %[1%] %(the options are ", msg)
  end)

  describe("a pool's methods", function()
    local p
    setup(function() p = Parallelize({ noop }) end)
    teardown(function() p:stop() end)

    it("wait and stop name the type of a wrong timeout", function()
      local l = line() + 1
      local msg = message_of(function() p:wait("1") end, l)
      assert.equal('wait: timeout must be a non-negative number (got a string "1")', msg)
      l = line() + 1
      msg = message_of(function() p:wait(-1) end, l)
      assert.equal("wait: timeout must be a non-negative number (got -1)", msg)
      l = line() + 1
      msg = message_of(function() p:stop(true) end, l)
      assert.equal("stop: finish_timeout must be a non-negative number (got a boolean true)", msg)
    end)

    for _, method in ipairs({ "wait", "stop" }) do
      it(("called with a dot, say to use a colon: p.%s()"):format(method), function()
        assert.equal("function", type(p[method]))
        local l = line() + 1
        local msg = message_of(function() p[method]() end, l)
        assert.equal(("use p:%s(), not p.%s()"):format(method, method), msg)
        l = line() + 1
        msg = message_of(function() p[method](5) end, l)
        assert.equal(("use p:%s(), not p.%s()"):format(method, method), msg)
      end)
    end

    it("still work after those mistakes", function()
      p()
      assert.is_true(p:wait(10))
      assert.same({}, p.errors)
    end)
  end)

  it("Parallelize and Deferred called with a colon say to use a dot", function()
    local l = line() + 1
    local msg = message_of(function() parallelize:Parallelize({ noop }) end, l)
    assert.equal("use parallelize.Parallelize(...), not parallelize:Parallelize(...)", msg)
    l = line() + 1
    msg = message_of(function() parallelize:Deferred(noop) end, l)
    assert.equal("use parallelize.Deferred(...), not parallelize:Deferred(...)", msg)
  end)
end)

describe("outside LuaJIT 2.1", function()
  it("requiring the module from PUC Lua 5.1 fails at once, saying what it needs", function()
    local out, status = support.run("command -v lua5.1")
    assert.equal(0, status, "lua5.1 is not installed (make deps installs it): " .. out)
    out, status = support.run("lua5.1 -e " .. support.quote('package.path = "lua/?.lua;" .. package.path')
      .. " -e " .. support.quote('package.cpath = "build/?.so;" .. package.cpath')
      .. " -e " .. support.quote('require "parallelize"'))
    assert.equal(1, status)
    assert.matches("^lua5%.1: parallelize needs LuaJIT 2%.1 %(this is Lua 5%.1%)\nstack traceback:\n", out)
    assert.falsy(out:find("undefined symbol", 1, true))
  end)
end)
