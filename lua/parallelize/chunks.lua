--- parallelize.chunks: p:map with many items per call. A chunk is one
-- call whose worker runs the executor on each of its items in turn and
-- answers for all of them (src/chunk.h); this file decides how many items
-- each chunk carries and turns the answers back into the map's results,
-- and says what the pool's store keeps of a chunk's answer that its map
-- let go (M.stored): a chunk stopped at an item that raised is that item's
-- error record, never the results of the items before it alone.
-- Main thread only. The claims, waits and messages are pool.lua's, bound
-- once (M.bind).
local core = require "parallelize.core"
local caller = require "parallelize.caller"
caller.mark()

local type, error, tostring, setmetatable, pairs = type, error, tostring, setmetatable, pairs
local format = string.format
local floor, ceil, min, max, remove = math.floor, math.ceil, math.min, math.max, table.remove
local new_table = require "table.new"
local pool_size, pool_counts, pool_submit_each, pool_submit_chunk =
  core.pool_size, core.pool_counts, core.pool_submit_each, core.pool_submit_chunk
local null, settle_after, ERROR_MT = core.null, core.settle_after, core.error_metatable

local M = {}

-- pool.lua's helpers (M.bind).
local new_claim, release, wait_for, check_status, done_waiting, item_failed, raise_unsent, map_error
local release_after_map
-- pool_submit_each's list of ids, written only when another call took an
-- id between two of its items: never for one item.
local NO_IDS = {}

-- How long a chunk should run. At least CHUNK_MIN_SECONDS: its frame, id
-- and record then cost little beside it. At most CHUNK_MAX_SECONDS: the
-- first results come soon, and one slow chunk cannot hold the end back for
-- long. In between, the guided rule (Polychronopoulos and Kuck): the items
-- left, shared by twice the workers, so chunks are big while much is left
-- and small near the end, where the workers must finish together.
local CHUNK_MIN_SECONDS, CHUNK_MAX_SECONDS = 0.002, 0.1
-- Items in each worker's first chunk, before any chunk's time is known, at
-- most: and no more than the guided share either, since an item's cost is
-- not known yet (16 items of 0.1 s in one chunk would hold one worker for
-- 1.6 s while the others had nothing).
local FIRST_CHUNK = 16
-- Bytes a chunk's items may carry encoded (see chunk_end).
local CHUNK_BYTES = 262144
-- Items a chunk carries at most: its tables of items and of results (one
-- in the worker, one here) then take under 128 KiB each, which LuaJIT's
-- allocator serves from its heap and reuses. A larger table is mapped
-- afresh from the kernel and unmapped when collected, and its page faults
-- cost more than its items' whole trip (p:map of 2,000,000 tiny items:
-- 12.9-13.9 M/s with chunks of up to 16,000 items, 10.4-14.0 M/s without
-- this bound, its chunks then 30,000 to 50,000 items).
local CHUNK_ITEMS = 16000

--- The size of the next chunk: `left` items to go among `workers`, each
-- item taking `per_item` seconds as the last chunk ran (nil while no chunk
-- has answered), at most `byte_cap` items (CHUNK_BYTES) and CHUNK_ITEMS.
local function chunk_size(left, workers, per_item, byte_cap)
  local want = ceil(left / (2 * workers))
  if not per_item then
    want = min(want, FIRST_CHUNK)
  elseif per_item > 0 then
    want = min(max(want, CHUNK_MIN_SECONDS / per_item), CHUNK_MAX_SECONDS / per_item)
  end
  return max(1, floor(min(want, byte_cap, left, CHUNK_ITEMS)))
end

--- The last item of a chunk from list[i] to at most list[j]: it ends
-- before its strings pass CHUNK_BYTES. Big items gain nothing from
-- sharing a call, and a chunk of them would be copied whole once more.
local function chunk_end(list, i, j)
  local bytes = 0
  for k = i, j do
    local v = list[k]
    bytes = bytes + (type(v) == "string" and #v or 8)
    if bytes > CHUNK_BYTES then return k > i and k - 1 or i end
  end
  return j
end

--- The results array of chunk id whose answer was decoded into its map's
-- output (src/lrecords.c), made after all for the pool's store (release,
-- after the map raised), null for nil as in the map's results (those the
-- map took are so already); it replaces true in the answer ex. `info` is
-- the map's claim.chunks, which outlives the map's own upvalues (cleared
-- when it returns) for a release that stopped halfway, short of memory.
function M.restore(info, id, ex)
  local i, count = info.into_at[id] + 1, info.counts[id]
  local ran = ex.n > 2 and ex[3] - 1 or count
  local out, results = info.into, {}
  for k = 1, ran do
    local v = out[i + k - 1]
    if v == nil then v = null end
    results[k] = v
  end
  ex[1] = results
  return results
end

--- What the pool's store keeps of the answer of chunk id (its values:
-- results, seconds[, k, message, traceback]) that its map no longer takes:
-- nil when every item ran (results, its array, is then made whole here:
-- null for nil), or, when item k raised, the error record of that item,
-- as the map would have raised it: message "map: item K failed: ..." (K
-- its index in the map's list), the worker's traceback, value the item's
-- message, args as stop() gives the chunk ({n = 2, items, count}), plus
-- results (the items' before it, null for nil) and first (the chunk's
-- first item in the list: K = first + #results). The one place both
-- paths to the store go through, so they cannot disagree: release, for
-- an answer in the claim's lists, and the drain (env.chunk_answer), for
-- one that came after the release (src/lrecords.c). `info` is the map's
-- claim.chunks, found by id (env.chunks) or, for the chunk an interrupt
-- left untracked, by tag (env.chunk_tags); nil only if neither named it,
-- which no chunk the map queued is left to (the fallback message below).
function M.stored(info, id, results, _, k, message, traceback)
  local first, count, who
  if info then
    first = info.into_at[id] and info.into_at[id] + 1 or info.starts[id]
    count, who = info.counts[id], info.who
    -- the chunk queued when an interrupt came, before it was tracked
    -- (M.register: its answer found by its tag)
    if first == nil and info.pending then first, count = info.pending, info.pending_count end
  end
  local ran = k and k - 1 or count or 0
  if type(results) == "table" then
    for j = 1, ran do
      if results[j] == nil then results[j] = null end
    end
  end
  if k == nil then return nil end
  local e = { id = id, kind = "raised", traceback = tostring(traceback or ""), value = message,
    attempts = {}, results = results, first = first }
  if first and count then
    -- (the items as they were when the map let the chunk go: the list is
    -- the caller's again, who may refill it for the next map)
    local items = info.kept and (info.kept[id] or first == info.pending and info.kept.pending)
    if not items then
      -- (an answer the release takes from the lists: the map's list is
      -- there until the release is whole, then only kept items are read)
      local list = info.list or {}
      items = {}
      for j = 1, count do items[j] = list[first + j - 1] end
    end
    e.message = format("%s: item %d failed: %s", who, first + k - 1, tostring(message))
    e.args = { n = 2, items, count }
  else
    e.message = format("map: item %s of call %s (a chunk of a map's items) failed: %s", tostring(k),
      tostring(id), tostring(message))
    e.args = { n = 0 }
  end
  return setmetatable(e, ERROR_MT)
end

--- Gives `out` (the pool's env.chunks: call id -> info) the map's chunks
-- not taken yet, before its claim is released: once the tag is released,
-- the drain finds there what M.stored needs for an answer that comes. An
-- entry goes once its answer is stored (or at stop).
-- A chunk queued but not tracked yet when an interrupt came (info.pending)
-- has no id here: `by_tag` (the pool's env.chunk_tags) gives the map's
-- tag its info, for the drain to find by the answer's tag (a tag is not
-- claimed again while a call of it is out).
-- The items of each such chunk are kept as they are now (info.kept), for
-- its error record's args: once the map has returned, its list is the
-- caller's, who may change it before the answer comes.
local function slice(list, first, count)
  local items = {}
  for j = 1, count do items[j] = list[first + j - 1] end
  return items
end

function M.register(info, out, by_tag, tag)
  local counts, list = info.counts, info.list
  local kept = info.kept or {}
  info.kept = kept
  local pending = info.pending
  for id, first in pairs(info.starts) do
    local count = counts[id]
    if count > 0 then
      if not kept[id] then kept[id] = slice(list, first, count) end
      out[id] = info
      -- (tracked already: the interrupt came after track, before pending
      -- was cleared; an entry by tag would outlive its answer)
      if first == pending then pending = false end
    end
  end
  if pending then
    if not kept.pending then kept.pending = slice(list, info.pending, info.pending_count) end
    by_tag[tag] = info
  end
end

--- The error p:map raises for item i: message and traceback.
local function item_error(who, i, message, traceback)
  return item_failed(who, i, { message = message, traceback = traceback })
end

--- Runs p(list[i]) for every i of list[1..n] in chunks: each chunk is one
-- call that the worker runs as its items' calls, one after the other.
-- Chunks are submitted a few per worker at a time, sized by the time the
-- last one took. A chunk that failed as a whole (its worker died running
-- it, or its answer could not travel) runs again as one call
-- per item, so that the error names its item. Returns the first results in
-- input order (null for nil).
function M.map(p, list, n, who)
  local claim = new_claim(p)
  local lists, tag = claim.lists, claim.tag
  local workers = pool_size(p)
  local per_item          -- seconds an item ran in the last chunk
  local byte_cap = n      -- items per CHUNK_BYTES, as the last chunk had them
  local window = max(2, 2 * workers)
  local starts, counts = {}, {} -- call id -> its first item, its item count
  -- (starts is cleared when the map returns: a claim left running then,
  -- its move to the store stopped short of memory, owns its whole range,
  -- as an unchunked map's does)
  claim.owns = function(id) return starts == nil or starts[id] ~= nil end
  local out = new_table(n, 0)
  -- A chunk's answer is decoded straight into out (src/lrecords.c): its
  -- results table is never made. into_at[id] is where its items start, less
  -- one; it stays after its answer was taken, as counts[id] does, for
  -- M.restore.
  local into_at = {}
  lists.into, lists.into_at = out, into_at
  -- What the store needs of the chunks once the map has let them go
  -- (M.restore, M.stored, M.register): kept by the claim, past the map's
  -- return, for a release that ran out of memory halfway.
  -- pending: the first item of the chunk queued and not tracked yet
  -- (false between chunks; set by pool_submit_chunk as it queues it), with
  -- pending_count its items: an interrupt between its queuing and track
  -- leaves it in no table but these (M.register). Both keys exist from
  -- here on, so that C's stores into them never allocate.
  local info = { who = who, list = list, starts = starts, counts = counts, into = out, into_at = into_at,
    pending = false, pending_count = 0 }
  claim.chunks = info
  local items, items_n = {}, 0 -- the chunks' items (see submit)
  local next_i, done, outstanding, kr, ke = 1, 0, 0, 1, 1

  local function track(id, i, count)
    starts[id], counts[id] = i, count
    outstanding = outstanding + 1
    if not claim.first then claim.first = id end
    claim.last = id
  end

  -- Queues items i..j: one item as its own call, more as a chunk, halved
  -- while its items cannot travel as one call (one cannot be encoded, or
  -- together they are above max_message): down to an item's own call,
  -- whose error names the item and says what p(item) would.
  local function submit(i, j)
    if i == j then
      info.pending = false
      local id, _, _, err = pool_submit_each(p, tag, list, i, i, NO_IDS)
      if err then raise_unsent(who, i, err) end
      return track(id, i, 0)
    end
    -- One table carries every chunk's items: it is encoded before
    -- pool_submit_chunk returns, and a fresh one per chunk cost page
    -- faults. What a longer chunk left beyond this one's end is cleared.
    local count = j - i + 1
    for k = 1, count do items[k] = list[i + k - 1] end
    for k = count + 1, items_n do items[k] = nil end
    items_n = count
    -- (queued, it is noted in info as pending before the C function
    -- returns: no interrupt can come between the two)
    local id, bytes = pool_submit_chunk(p, tag, items, count, info, i)
    if id then
      -- Tracked before into_at names it: M.restore needs its count
      -- (an interrupt between the two leaves its answer decoded whole).
      track(id, i, count)
      into_at[id] = i - 1
      info.pending = false
      -- The next chunks carry about CHUNK_BYTES at most, whatever their
      -- items look like (tables).
      byte_cap = max(1, floor(count * CHUNK_BYTES / max(bytes, 1)))
      return
    end
    local mid = floor((i + j) / 2)
    submit(i, mid)
    submit(mid + 1, j)
  end

  -- One answer: a chunk's (true, seconds[, k, message, traceback]), its
  -- results already in out, or the first result of a call made for a
  -- single item. Returns the error the map raises, if the answer is one.
  local function take_result(id, first)
    local i, count = starts[id], counts[id]
    starts[id] = nil
    outstanding = outstanding - 1
    local ex = lists.extras[id]
    if count == 0 then -- one item's own call
      out[i] = first
      done = done + 1
      return
    end
    local seconds = ex[2]
    local ran = ex.n > 2 and ex[3] - 1 or count
    for k = i, i + ran - 1 do
      if out[k] == nil then out[k] = null end
    end
    done = done + ran
    if ex.n > 2 then return item_error(who, i + ex[3] - 1, ex[4], ex[5]) end
    per_item = seconds / count
  end

  local reported -- where the error the map raises is in lists.errors
  local function take_error(e)
    local i, count = starts[e.id], counts[e.id]
    starts[e.id], counts[e.id] = nil, nil
    outstanding = outstanding - 1
    if count <= 1 then
      reported = ke - 1 -- it is the map's error: settle takes it from the lists
      return item_failed(who, i, e)
    end
    -- The chunk failed whole: its items run again, one call each.
    for k = i, i + count - 1 do submit(k, k) end
  end

  local failure
  local function work()
    while done < n do
      while outstanding < window and next_i <= n do
        local size = chunk_size(n - next_i + 1, workers, per_item, byte_cap)
        local j = chunk_end(list, next_i, next_i + size - 1)
        submit(next_i, j)
        next_i = j + 1
      end
      if #lists.ids < kr and #lists.errors < ke then
        local _, finished = pool_counts(p)
        check_status(p, wait_for(p, "progress", nil, finished + 1))
      end
      -- (Taking an answer may queue calls, and queuing may drain more
      -- answers into the lists: they are read to their current end.)
      while kr <= #lists.ids do
        kr = kr + 1
        failure = take_result(lists.ids[kr - 1], lists.results[kr - 1])
        if failure then return end
      end
      while ke <= #lists.errors do
        ke = ke + 1
        failure = take_error(lists.errors[ke - 1])
        if failure then return end
      end
    end
  end
  -- Whatever ended the work (its end, an error, Ctrl-C), this runs after
  -- it, deferred (core.settle_after): the claim is released and the
  -- results reach the caller.
  local function settle(ok, err)
    done_waiting(p)
    -- A map that raised hands every answer of its chunks, taken or not, to
    -- the pool's store, as an unchunked map's would be (the store is where
    -- nothing is lost: see release); the chunks still running go there too,
    -- but for the failed item that the map's error reports when it ran as
    -- a call of its own. A chunk stopped at an item that raised goes there
    -- as that item's error record (M.stored), the one whose item the map
    -- reports too: the items before it ran, and the record holds their
    -- results. One that ended well has consumed them all.
    -- (the message made whole first: short of memory, the item reported
    -- must not be taken from the lists with its message then lost)
    if ok and failure then failure = caller.where() .. failure end
    if ok and failure and reported then remove(lists.errors, reported) end
    if ok and not failure then claim.kr, claim.ke = kr, ke end
    -- Out of memory halfway, the claim stays running, and the next wait,
    -- take or stop moves the rest: what M.restore and M.stored read is
    -- kept for it in claim.chunks.
    -- A map that got every answer returns them, and one that failed raises
    -- its item's error, even when the release ran out of memory: what it
    -- consumed (the answers, the error it reports) would otherwise be in
    -- no place (the release moves only the rest).
    if ok then
      release_after_map(p, claim, failure)
    elseif not pcall(release, p, claim) then
      caller.reraise(map_error(who, err))
    end
    -- The closures above can outlive the map: a compiled trace that called
    -- one keeps it, and with it what its upvalues hold, until the JIT
    -- flushes the trace. Cleared here, the upvalues no longer hold the
    -- list, its items, the answers, the output (200 strings of 200 KB
    -- stayed reachable after the map returned) or the pool (a pool dropped
    -- after a map was never collected, its workers never stopped).
    local results = out
    -- (into_at is read through claim.chunks: the map's code only writes it)
    list, out, items, starts, counts, into_at = nil, nil, nil, nil, nil, nil -- luacheck: ignore 331
    lists, claim, p, info = nil, nil, nil, nil -- luacheck: ignore 331
    if not ok then caller.reraise(map_error(who, err)) end
    if failure then error(failure, 0) end
    return results
  end
  return settle_after(work, settle)
end

--- Gives this file pool.lua's helpers: new_claim, release, wait_for,
-- check_status, done_waiting, item_failed, raise_unsent and map_error.
-- Returns the module.
function M.bind(h)
  new_claim, release, wait_for, check_status = h.new_claim, h.release, h.wait_for, h.check_status
  done_waiting, item_failed, raise_unsent = h.done_waiting, h.item_failed, h.raise_unsent
  map_error, release_after_map = h.map_error, h.release_after_map
  return M
end

return M
