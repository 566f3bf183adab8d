--- busted output handler used by tools/run-tests.sh.
--
-- usage: busted -o tools/busted_counts.lua -Xoutput COUNTS_FILE [...]
--        (or PZ_BUSTED_COUNTS=COUNTS_FILE in the environment)
--
-- Shows what busted's plainTerminal handler shows (a character per test,
-- then the failures and busted's own summary) and, at the end of the suite,
-- writes one line to COUNTS_FILE:
--
--     successes failures errors pendings
--
-- then one line per pending (skipped) test: its full name, and after a
-- tab the reason it gave, if any, without busted's "file:line: " prefix
-- (newlines and tabs in either become spaces).  COUNTS_FILE.failed gets
-- one line per failed or errored test: its name and the first line of
-- its message.
--
-- The counts go to a file of their own rather than to stdout, so that
-- whatever the specs or the processes they start print cannot garble them.
-- No file means busted never reached the end of the suite (a crash, a hang
-- killed by a timeout, os.exit in a spec): run-tests.sh counts that as a
-- failure.

return function(options)
  local busted = require "busted"
  local handler = require "busted.outputHandlers.plainTerminal"(options)

  local path = options.arguments and options.arguments[1]
  if path == nil or path == "" then path = os.getenv("PZ_BUSTED_COUNTS") end

  local function write_counts()
    if not path or path == "" then return nil, true end
    local f, err = io.open(path, "w")
    if not f then
      io.stderr:write("busted_counts: cannot write counts: ", tostring(err), "\n")
      return nil, true
    end
    f:write(string.format("%d %d %d %d\n", handler.successesCount, handler.failuresCount,
                          handler.errorsCount, handler.pendingsCount))
    for _, p in ipairs(handler.pendings) do
      -- busted prefixes the reason with where pending() was called
      local reason = type(p.message) == "string" and p.message:gsub("^[^\n:]*:%d+: ", "") or ""
      f:write((tostring(p.name):gsub("[\t\n]", " ")), "\t", (reason:gsub("[\t\n]", " ")), "\n")
    end
    f:close()
    -- The failed and errored tests, one line each ("name: first line of
    -- the message"), in a file of their own: run-tests.sh repeats them in
    -- its closing summary, which is all a truncated log may keep.
    local failed = io.open(path .. ".failed", "w")
    if failed then
      for _, list in ipairs({ handler.failures, handler.errors }) do
        for _, t in ipairs(list) do
          local message = type(t.message) == "string" and t.message or tostring(t.message)
          failed:write((tostring(t.name):gsub("[\t\n]", " ")), ": ",
            (message:match("^[^\n]*"):sub(1, 300)), "\n")
        end
      end
      failed:close()
    end
    return nil, true
  end

  -- Registered after plainTerminal's own subscriber, so its report comes
  -- first; the counts are final once the suite has ended.
  busted.subscribe({ "suite", "end" }, write_counts)

  return handler
end
