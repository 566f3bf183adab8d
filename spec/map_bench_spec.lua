-- The benchmark scripts of `pzlua --map` (bench/mapcli.lua, bench/map_rss.lua)
-- run and check what they claim to: each system's output is verified by the
-- script itself, and a wrong count must fail it. Speed is `make bench`'s;
-- only the shape and the sanity of the figures are checked here.
local support = require "spec.support"

local pzlua = support.run_bench

describe("bench/mapcli.lua", function()
  for _, case in ipairs({ { "pzmap", 500 }, { "pzmap_k", 500 }, { "gnu_pipe", 500 }, { "gnu_job", 10 },
      { "xargs", 10 } }) do
    local system, lines = case[1], case[2]
    it("measures " .. system .. " and checks every record it wrote", function()
      local kv, out, status = pzlua("mapcli.lua", system .. " " .. lines .. " 2")
      assert.are.equal(0, status, out)
      if kv.skipped then
        assert.is_truthy(system:match("^gnu") or system == "xargs", out)
        return
      end
      assert.are.same({ system, tostring(lines), "2" }, { kv.system, kv.lines, kv.workers })
      local seconds, rate = tonumber(kv.seconds), tonumber(kv.lines_per_s)
      assert.is_true(seconds > 0 and math.abs(rate * seconds - lines) < 1e-3 * lines, out) -- 6 digits each
    end)
  end

  it("refuses an unknown system", function()
    local _, out, status = pzlua("mapcli.lua", "awk 10 2")
    assert.are.equal(2, status)
    assert.matches("usage: mapcli.lua pzmap|pzmap_k|gnu_pipe|gnu_job|xargs LINES WORKERS", out, 1, true)
  end)
end)

describe("bench/map_rss.lua", function()
  it("samples the command's RSS as the lines come out, and checks them all", function()
    local kv, out, status = pzlua("map_rss.lua", "40000 10000")
    assert.are.equal(0, status, out)
    assert.are.same({ "40000", "10000" }, { kv.lines, kv.sample_every })
    local samples = {}
    for v in kv.rss_mib_at:gmatch("[^,]+") do samples[#samples + 1] = tonumber(v) end
    assert.are.equal(4, #samples)
    for _, v in ipairs(samples) do assert.is_true(v > 1 and v < 1024, out) end
    assert.is_true(tonumber(kv.lines_per_s) > 0)
  end)
end)
