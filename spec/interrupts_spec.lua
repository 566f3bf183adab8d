-- Ctrl-C at random moments, a few of each kind (the harness and its
-- checks are spec/interrupts.lua's; `make soak-interrupts` runs hundreds):
-- under pzlua and a plain luajit, one trial of every mode (p(i) loops with
-- waits and take, long compiled loops of p(i) with and without
-- max_pending, p:result, maps chunked and not, streams ordered and not,
-- pools made, read and stopped), and two of pzlua --map. None may lose the
-- interrupt or find a call in no place or in two.
local harness = require "spec.interrupts"

describe("Ctrl-C at random moments", function()
  it("comes out of every blocking method at once, and every call stays in one place", function()
    local lines = {}
    local rows, total = harness.run({
      trials = 1, cli_trials = 2, cli_lines = 50000,
      progress = function(line) lines[#lines + 1] = line end,
    })
    assert.equal(#harness.modes * 2 + 1, #rows)
    assert.equal(total.trials, total.ok, table.concat(lines, "\n"))
  end)
end)
