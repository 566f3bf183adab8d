--- parallelize.pool: the methods and properties of a pool, the userdata that
-- core.pool_new makes. The C core (src/lpool.c, src/lrecords.c) fills the
-- tables of the pool's environment; this file reads them:
--
--   results, ids, errors, extras   the pool's store, when keep_results
--   unclaimed                      the pool's store otherwise: id -> entry
--   claims[tag]                    the lists a map or a stream consumes
--   chunks, chunk_answer           for a map's chunk answering after its
--                                  map let it go: what chunks.lua's
--                                  stored needs (chunks.register), and
--                                  that function, which the drain calls
--   chunk_tags                     tag -> the same, for the one chunk an
--                                  interrupt left untracked (no id)
--
-- A result entry is {n = count, ...} (every value), an error entry an
-- error record; in the lists, results[i] is the first value (null for
-- nil), extras[id] every value when there are not exactly one non-nil.
local core = require "parallelize.core"
local options = require "parallelize.options"
local caller = require "parallelize.caller"
local progress = require "parallelize.progress"
caller.mark()

local error, type, select, pairs, ipairs, tostring, pcall, unpack =
  error, type, select, pairs, ipairs, tostring, pcall, unpack
local getmetatable, setmetatable = getmetatable, setmetatable
local format, floor, sort = string.format, math.floor, table.sort
local new_table = require "table.new"
local clear_table = require "table.clear"
local rawgetmetatable = debug.getmetatable -- the pool's metatable hides itself

local pool_wait, pool_drain, pool_stop = core.pool_wait, core.pool_drain, core.pool_stop
local pool_draining = core.pool_draining
local pool_env, pool_counts, pool_size = core.pool_env, core.pool_counts, core.pool_size
local pool_stopped, pool_submit, pool_finished = core.pool_stopped, core.pool_submit, core.pool_finished
local pool_submit_each = core.pool_submit_each
local pool_claim, pool_release, now = core.pool_claim, core.pool_release, core.now
local null, ERROR_MT = core.null, core.error_metatable
local atomically, settle_after, commit = core.atomically, core.settle_after, core.commit
local describe = options.describe

local pool_mt = core.pool_metatable
local methods, properties = {}, {}
caller.mark_c(atomically)
caller.mark_c(settle_after)

-- p(...), the pool's __call. The C function core.pool_call does it all,
-- but a C function called through a metamethod costs a compiled loop more
-- than queuing a number does. So while the JIT runs, one number, or one
-- string shorter than the arena's threshold, goes to core.fast_submit
-- through the FFI instead, from a function of fixed arity (which the JIT
-- compiles on its own when its caller is interpreted; a vararg one it does
-- not). core.fast_submit returns the call's id; 0 when core.pool_call must
-- decide (src/lsubmit.c says when); -1, every 1024th call, for a look at
-- whether the JIT still runs (jit.status() costs several calls' time):
-- interpreted, the FFI costs more than the C API, so once the JIT is seen
-- off, the C function becomes the __call again, for good. fast_of holds
-- each pool's address, for pools only: another userdata given this
-- metamethod goes to the C function, which refuses it.
local call_c = core.pool_call
caller.mark_c(call_c)
local fast_of = setmetatable({}, { __mode = "k" })
local fast_number, fast_string, fast_tagged_number, fast_tagged_string, address_of
do
  local has_ffi, ffi = pcall(require, "ffi")
  if has_ffi then
    local fast = ffi.cast(ffi.typeof("struct { double (*number)(void *, double);"
      .. " double (*string)(void *, const char *, size_t);"
      .. " double (*tagged_number)(void *, double, double);"
      .. " double (*tagged_string)(void *, double, const char *, size_t); } *"), core.fast_submit)
    fast_number, fast_string = fast.number, fast.string
    fast_tagged_number, fast_tagged_string = fast.tagged_number, fast.tagged_string
    -- A pointer cdata: the JIT does not pass a light userdata as a pointer.
    local void_ptr = ffi.typeof("void *")
    address_of = function(p) return ffi.cast(void_ptr, core.pool_address(p)) end
  end
end
local jit_status = jit.status

-- Run protected (call below): when Ctrl-C lands in a compiled loop of
-- p(x), the next p(x) is declined (a hook is set) and leaves the trace
-- in this function, where the hook fires and raises "interrupted!" at the
-- position of the Lua function running, a line of this file. Caught, it
-- is raised again at the user's line (caller.reraise), as parallelize's
-- other functions do.
local function fast_call(u, x)
  local kind, id = type(x), 0
  if kind == "number" then
    id = fast_number(u, x)
  elseif kind == "string" then
    id = fast_string(u, x, #x)
  end
  if id > 0 then return id end
  if id < 0 and not jit_status() then pool_mt.__call = call_c end
  return 0
end

--- Queues item x for a map's or stream's tag as core.pool_submit(p, tag,
-- nil, x) would, through the FFI (u: fast_of[p]); returns its id, or nil
-- when pool_submit must decide (the same cases as p(x)'s, and a tag no
-- longer active). A C function called from a compiled loop ends its
-- trace: a stream from an iterator paid that once per input.
local function fast_submit_tagged(u, tag, x)
  local kind, id = type(x), 0
  if kind == "number" then
    id = fast_tagged_number(u, tag, x)
  elseif kind == "string" then
    id = fast_tagged_string(u, tag, x, #x)
  end
  if id > 0 then return id end
  return nil
end

local function call(p, ...)
  if select("#", ...) == 1 then
    local u = fast_of[p]
    if u then
      local ok, id = pcall(fast_call, u, (...))
      if not ok then caller.reraise(id) end
      if id > 0 then return id end
    end
  end
  return call_c(p, ...)
end
pool_mt.__call = address_of and jit_status() and call or call_c

-- Ctrl-C's "interrupted!" is raised by a debug hook at whatever Lua
-- instruction runs when it comes (src/ldefer.h). Where a result moves from
-- one place to another (a claim's lists to the pool's store, the store or
-- a claim to the caller), the move runs deferred (core.atomically,
-- core.settle_after) or is one core.commit, so that an interrupt lands
-- before it or after it, never inside: every call stays in exactly one
-- place.

local M = { methods = methods, properties = properties }

-- What a stream's function source returns when it has no input ready:
-- the stream hands out what has finished meanwhile and asks again soon.
local LATER = setmetatable({}, {
  __tostring = function() return "parallelize.later" end,
  __newindex = function() error("parallelize.later is a constant", 2) end,
  __metatable = false,
})
M.later = LATER

-- How long a stream whose source had no input ready waits for results
-- before it asks the source again (seconds).
local LATER_WAIT = 0.01

-- How many string results a stream sees before it bounds the calls it
-- keeps out by their size (see refill).
local SIZED = 16

-- What a wait short of memory raises: nothing was lost.
local OUT_OF_MEMORY = "not enough memory to take the results that came (they stay queued: a wait once memory "
  .. "is freed takes them)"

-- What a stream raises when stepped again after an error or interrupt
-- left it halfway through queuing inputs (refill).
local STREAM_BROKEN = "stream: an error or interrupt left it while it queued inputs, and it cannot go on: what "
  .. "it had not handed out went to the pool's results"

-- What a stream raises when its source stepped it: that step raised
-- STREAM_BROKEN to the source and ended the stream.
local STREAM_SELF_STEPPED = "stream: its source stepped the stream, which cannot go on: what it had not handed out "
  .. "went to the pool's results"

-- What a stream raises once the pool was stopped under it.
local STREAM_STOPPED = "stream: the pool was stopped; what the stream had not handed out went to its results"

-- In an ordered stream's held_more: the answer held back is an error.
local FAILED = {}

--- Every method starts with this: a method called with a dot (`p.wait()`)
-- gets no pool as its first argument, and the user is told so rather than
-- about a bad argument to some function of the core.
local function check_self(p, method)
  if rawgetmetatable(p) ~= pool_mt then
    error(format("use p:%s(), not p.%s()", method, method), 3)
  end
end

local function check_timeout(who, name, t)
  if t ~= nil and (type(t) ~= "number" or t < 0 or t ~= t) then
    error(format("%s: %s must be a non-negative number (got %s)", who, name,
      type(t) == "number" and tostring(t) or describe(t)), 3)
  end
end

-- Waiting -------------------------------------------------------------------

--- Waits on the pool (core.pool_wait's `what`, `finished`, `below`) until
-- the deadline (monotonic seconds, or nil). A signal returns from the C
-- wait so that an interrupt hook (Ctrl-C's "interrupted!") fires here;
-- otherwise the wait goes on. Returns the final status.
local function wait_loop(p, what, deadline, finished, below)
  while true do
    local left
    if deadline then
      left = deadline - now()
      if left < 0 then left = 0 end
    end
    local status = pool_wait(p, what, left, finished, below)
    if status ~= "interrupted" then return status end
  end
end

--- Draws the pool's progress bar, if it has one and it is due.
local function draw(p, force)
  local bar = pool_env(p).bar
  if not bar or pool_stopped(p) then return end
  local calls, finished = pool_counts(p)
  progress.draw(bar, finished, calls, core.pool_stats(p).failed, force)
end

--- Ends the pool's progress bar: a blocking method returns.
local function done_waiting(p)
  local bar = pool_env(p).bar
  if not bar or (bar.tty and not bar.shown) or pool_stopped(p) then return end
  local calls, finished = pool_counts(p)
  -- (nothing drawn and nothing owed: progress.finish would write nothing,
  -- and the stats cost a table per p:result of a loop)
  if not bar.shown and (finished < calls or bar.drawn == finished) then return end
  progress.finish(bar, finished, calls, core.pool_stats(p).failed)
end
M.done_waiting = done_waiting

--- wait_loop, in slices when the pool draws a progress bar (redrawn
-- between them), with Ctrl-C's "interrupted!" raised at the user's line:
-- the interrupt hook raises it with the position of the Lua code running,
-- ours; it is caught here and raised again from the user's level. Other
-- errors go through unchanged.
local function wait_for(p, what, deadline, finished, below)
  local bar = pool_env(p).bar
  if bar then draw(p) end
  while true do
    local until_ = deadline
    if bar then
      local slice = now() + bar.every
      if not until_ or slice < until_ then until_ = slice end
    end
    local ok, status = pcall(wait_loop, p, what, until_, finished, below)
    if not ok then
      done_waiting(p)
      -- (the bare message says neither what failed nor that nothing did;
      -- the drain's own says the same: src/lrecords.c)
      if status == "not enough memory" then status = OUT_OF_MEMORY end
      caller.reraise(status)
    end
    if bar then draw(p) end
    if status ~= "timeout" or until_ == deadline then return status end
  end
end
-- Interrupt hooks fire only in the interpreter: compiled (or stitched)
-- code would loop back into the C wait without noticing Ctrl-C.
jit.off(wait_loop)
jit.off(wait_for)
M.wait_for = wait_for

--- Raises, at the user's line, what ended a wait other than its goal: the
-- reason the pool cannot go on ("fatal"), or, with fail_fast, the first
-- failure ("halted").  Returns for any other status.
local function check_status(p, status)
  if status ~= "fatal" and status ~= "halted" then return end
  done_waiting(p)
  local env = pool_env(p)
  if status == "fatal" then error(env.fatal, caller.level()) end
  local f, msg = env.first_failure
  if f == nil then
    msg = "fail_fast: the pool stopped dispatching after a failure"
  elseif f.worker then
    msg = format("fail_fast: worker %d was given up: %s", f.worker, tostring(f.message))
  else
    msg = format("fail_fast: call %d failed: %s", f.id, tostring(f.message))
  end
  error(msg, caller.level())
end

--- Waits until p(...) may queue a call (fewer than max_pending calls, and
-- fewer than max_pending_bytes of their arguments, wait for a worker):
-- p(...) calls it through env.wait_room when it finds no room.
function M.wait_room(p)
  check_status(p, wait_for(p, "room"))
  -- A bar on a terminal is erased, as any waiting method's, or what the
  -- script prints next would follow it on its line. (Written as lines, it
  -- gets no last line: a loop of p(...) would write one per call.)
  local bar = pool_env(p).bar
  if bar and bar.tty then done_waiting(p) end
end

--- p:wait([timeout]) -> true when every queued call has finished, false
-- when timeout seconds passed first. Raises when no worker is left.
local finish_moves -- (the claims' section, below)

function methods.wait(p, timeout)
  check_self(p, "wait")
  if pool_stopped(p) then error("wait: the pool is stopped", 2) end
  check_timeout("wait", "timeout", timeout)
  finish_moves(p)
  local status = wait_for(p, "calls", timeout and now() + timeout)
  -- With fail_fast, a failure raises here even when it was the last call
  -- to finish: whether another call was still running then is chance.
  if status == "done" and pool_env(p).fail_fast and pool_env(p).first_failure ~= nil then
    status = "halted"
  end
  check_status(p, status)
  done_waiting(p)
  return status == "done"
end

-- Claims: a map's or a stream's results, kept apart -----------------------

-- pool -> {claim -> claim}: the maps and streams running on each pool.
local running = setmetatable({}, { __mode = "k" })
-- pool -> {claim -> true}: claims whose move to the store has begun and
-- not ended (release_now).
local half_moved = setmetatable({}, { __mode = "k" })

--- Moves what a claim holds and nobody consumed (from read positions kr
-- and ke on) into the pool's store, and hands its tag back: its calls'
-- later results go to the store too. Nothing is lost when a map or stream
-- is abandoned (an error, Ctrl-C, stop). Run deferred (release).
--
-- Out of memory may stop it at any entry: the move's position (mr, me,
-- kh) is advanced past each entry once it is in the store, and the claim
-- stays running until every entry is, so that the next release (or
-- stop's) goes on where this one stopped, moving nothing twice and losing
-- nothing.
local chunk_register, chunk_restore, chunk_stored -- (chunks.lua's, bound below)

local function release_now(p, claim)
  if claim.released then return end
  local tag, lists = claim.tag, claim.lists
  -- A map's chunks (chunks.lua): what their answers need once in the
  -- store, left before the tag goes (the drain then stores them).
  local info = claim.chunks
  if not claim.tag_released then
    -- (noted first: a move that stops halfway is finished by the next
    -- wait or take, finish_moves, not left to stop; the chunks' register
    -- too, whose new keys may find no memory)
    local moving = half_moved[p] or {}
    half_moved[p] = moving
    moving[claim] = true
    if info then chunk_register(info, pool_env(p).chunks, pool_env(p).chunk_tags, tag) end
    pool_release(p, tag)
    claim.tag_released = true
    -- where the move is (kr and ke are the consumer's: a stream reads them)
    claim.mr, claim.me = claim.kr, claim.ke
  end
  local env = pool_env(p)
  local keep = claim.keep
  local function add_result(id, first, ex)
    if keep then
      local results, ids = env.results, env.ids
      -- a result stored without its id by a move that ran out of memory
      if #results > #ids then results[#results] = nil end
      if ex then env.extras[id] = ex end
      results[#results + 1] = first
      ids[#ids + 1] = id
    else
      env.unclaimed[id] = ex or { n = 1, first }
    end
  end
  -- An ordered stream's results taken from the lists and held back for
  -- an earlier input (claim.held_back), in id order: they are past kr.
  local held = claim.held_list
  if not held then
    held = claim.held_back and claim.held_back() or {}
    sort(held, function(a, b) return a.id < b.id end)
    claim.held_list, claim.kh = held, 1
  end
  for k = claim.kh, #held do
    local h = held[k]
    if h.err then
      if keep then env.errors[#env.errors + 1] = h.err else env.unclaimed[h.id] = h.err end
    else
      add_result(h.id, h.first, h.ex)
    end
    claim.kh = k + 1
  end
  for k = claim.mr, #lists.ids do
    local id, first = lists.ids[k], lists.results[k]
    local ex = lists.extras[id]
    local failed
    -- (or the chunk an interrupt left untracked: info.pending, chunks.lua)
    if info and ex and ((info.counts[id] or 0) > 0
        or (info.pending and info.counts[id] == nil and info.starts[id] == nil and type(ex[1]) == "table")) then
      -- A map's chunk: its results made from the map's output when they
      -- were decoded into it, and what the store keeps of it said where
      -- the drain says it for a later answer (chunks.lua's stored): its
      -- array of results, or its item's error record.
      if first == true and info.into_at[id] then first = chunk_restore(info, id, ex) end
      failed = chunk_stored(info, id, unpack(ex, 1, ex.n))
    end
    if not failed then
      add_result(id, first, ex)
    elseif keep then
      env.errors[#env.errors + 1] = failed
    else
      env.unclaimed[id] = failed
    end
    -- (cleared only where set: nil stored under a new key may allocate,
    -- and a raise here would move the entry again)
    if info and env.chunks[id] ~= nil then env.chunks[id] = nil end
    claim.mr = k + 1
  end
  for k = claim.me, #lists.errors do
    local e = lists.errors[k]
    if keep then env.errors[#env.errors + 1] = e else env.unclaimed[e.id] = e end
    -- (a map's chunk that failed whole, left in the lists: chunks.register
    -- gave it an entry, done with now as a result's is)
    if info and env.chunks[e.id] ~= nil then env.chunks[e.id] = nil end
    claim.me = k + 1
  end
  -- Moved whole: a map's chunk still out needs only what the register
  -- kept of it (its items, first and count), so the map's list (the
  -- caller's again) and output are not pinned until it answers.
  if info then info.list, info.into = nil, nil end
  claim.released = true
  running[p][claim] = nil
  half_moved[p][claim] = nil
end

--- Finishes the moves to the store that ran out of memory halfway
-- (release_now), so that a wait or take once memory is freed sees what
-- they held. Deferred. A move that fails again stays for the next.
local function finish_moves_now(p)
  for claim in pairs(half_moved[p]) do release_now(p, claim) end
end

--- finish_moves_now when there is a move to finish.
function finish_moves(p)
  local moving = half_moved[p]
  if moving and next(moving) ~= nil then pcall(atomically, finish_moves_now, p) end
end

--- release_now, deferred: Ctrl-C cannot stop it halfway.
local function release(p, claim)
  return atomically(release_now, p, claim)
end

--- Releases the claims of p's streams whose iterators were collected
-- unfinished (a loop left by break or an error): nothing can step them
-- again, and their tags are wanted (PZ_TAGS). What they hold goes to the
-- pool's store, as stop would send it.
local function release_abandoned(p)
  for _, claim in pairs(running[p] or {}) do
    if claim.abandoned then release_now(p, claim) end
  end
end

local function new_claim_now(p)
  local ok, tag = pcall(pool_claim, p)
  if not ok then
    -- Every tag is taken: those of streams left early and since collected
    -- are freed (once their calls are answered) rather than held until stop.
    release_abandoned(p)
    ok, tag = pcall(pool_claim, p)
    if not ok then
      collectgarbage() -- the finalizers of iterators no longer reachable
      release_abandoned(p)
      ok, tag = pcall(pool_claim, p)
    end
    if not ok then error((tostring(tag):gsub("^[^:]*:%d+: ", "")), caller.level()) end
  end
  local env = pool_env(p)
  -- (a map's untracked chunk on this tag answered, or never was queued)
  if env.chunk_tags[tag] ~= nil then env.chunk_tags[tag] = nil end
  local claim = { tag = tag, lists = env.claims[tag], kr = 1, ke = 1, keep = env.keep_results,
    first = nil, last = nil }
  running[p] = running[p] or {}
  running[p][claim] = claim -- (by the claim: one released halfway keeps its place, its tag reused)
  return claim
end

--- A new claim on p: its results go to lists of its own. Deferred: a
-- claim the core knows is one stop releases.
local function new_claim(p)
  return atomically(new_claim_now, p)
end

--- True when call id belongs to a map or stream running on p.
local function claimed(p, id)
  for _, claim in pairs(running[p] or {}) do
    if claim.first and id >= claim.first and id <= claim.last and claim.owns(id) then return true end
  end
  return false
end

-- Stop ----------------------------------------------------------------------

--- p:stop([finish_timeout]) -> the arguments of every call that never
-- finished, each {n =, id =, ...}. What maps and streams had not consumed
-- goes to the pool's store, so that results + errors + aborted = calls.
--- What core.pool_stop runs once the pool has stopped, deferred and
-- before Ctrl-C during the stop can fire: the claims are released and
-- the aborted list reaches the caller.
local function stop_settle(p, aborted)
  for _, claim in pairs(running[p] or {}) do release_now(p, claim) end
  local env = pool_env(p)
  -- (no answer comes now: what chunks still out needed goes, and with it
  -- their maps' lists)
  clear_table(env.chunks)
  clear_table(env.chunk_tags)
  env.aborted_count = (env.aborted_count or 0) + #aborted
  return aborted
end

function methods.stop(p, finish_timeout)
  check_self(p, "stop")
  check_timeout("stop", "finish_timeout", finish_timeout)
  return pool_stop(p, finish_timeout, function(aborted) return stop_settle(p, aborted) end)
end

-- Results -------------------------------------------------------------------

local function copy_array(t)
  local n = #t
  local c = new_table(n, 0) -- sized once: 200,000 results copied in 0.7 ms, not 1.1
  for i = 1, n do c[i] = t[i] end
  return c
end

--- Raises unless the pool keeps results (option keep_results).
local function check_kept(p, what)
  if not pool_env(p).keep_results then
    error(format("%s is not kept (keep_results = false): take results with p:take(), "
      .. "p:result(id), p:map() or p:stream()", what), 3)
  end
end

-- Copies, made when read: sorting or clearing what the caller holds never
-- touches the pool.
for _, name in ipairs({ "results", "ids", "errors" }) do
  local what = "p." .. name
  properties[name] = function(p)
    pool_drain(p)
    finish_moves(p)
    check_kept(p, what)
    return copy_array(pool_env(p)[name])
  end
end
properties.init_errors = function(p)
  pool_drain(p)
  return copy_array(pool_env(p).init_errors)
end

-- What take raises short of memory, with nothing lost.
local TAKE_OUT_OF_MEMORY = "take: not enough memory to hand over the results (they stay in the pool: a take "
  .. "once memory is freed hands them over)"

local function four_lists(n)
  return new_table(n, 0), new_table(n, 0), new_table(n, 0), new_table(n, 0)
end

--- p:take() -> results, ids, errors: everything finished in the pool's
-- store, which keeps none of it afterwards (ids[i] is the call of
-- results[i]; extra return values are dropped: use p:result for them).
--
-- A finalizer may call p:take() too. Inside a drain it takes nothing: the
-- drain appends to the lists this would swap out, and what it appended
-- after went with them (and an error raised there would pass from the
-- finalizer to the drain, which would blame a result for it). Nor may it
-- come between another take's read of the lists and its swap: both would
-- return the same results. So the new lists are made first (making a
-- table can run a finalizer), and nothing between the read and the swap
-- allocates.
local function take_now(p)
  if pool_draining(p) then return {}, {}, {} end
  pool_drain(p)
  local moving = half_moved[p]
  if moving and next(moving) ~= nil then pcall(finish_moves_now, p) end
  local env = pool_env(p)
  local fresh1, fresh2, fresh3, fresh4 = {}, {}, {}, {}
  if env.keep_results then
    local results, ids, errors = env.results, env.ids, env.errors
    env.results, env.ids, env.errors, env.extras = fresh1, fresh2, fresh3, fresh4
    env.index, env.indexed_results, env.indexed_errors = nil, 0, 0
    return results, ids, errors
  end
  -- Every list is made, sized, before the store is swapped out: short of
  -- memory, a take raises with the store untouched (a take that swapped
  -- first lost all it held). Making them can run a finalizer that takes
  -- or adds (a stream's release), so they are counted again after, and
  -- made again while they would not hold all.
  local unclaimed, list, results, ids, errors
  local n = -1
  while true do
    local count = 0
    for _ in pairs(env.unclaimed) do count = count + 1 end
    if count <= n then break end
    n = count
    local made
    made, list, results, ids, errors = pcall(four_lists, n)
    -- (the bare message says neither what failed nor that nothing did)
    if not made then error(list == "not enough memory" and TAKE_OUT_OF_MEMORY or list, 0) end
  end
  -- From here to the swap nothing allocates.
  unclaimed = env.unclaimed
  for id in pairs(unclaimed) do list[#list + 1] = id end
  env.unclaimed = fresh1
  sort(list)
  for _, id in ipairs(list) do
    local e = unclaimed[id]
    if getmetatable(e) == ERROR_MT then
      errors[#errors + 1] = e
    else
      local first = e[1]
      if first == nil then first = null end
      results[#results + 1] = first
      ids[#ids + 1] = id
    end
  end
  return results, ids, errors
end

--- (Deferred: what the store no longer keeps reaches the caller. A tail
-- call: no instruction of this file between the hand-over and the caller,
-- where Ctrl-C would lose what was handed over.)
function methods.take(p)
  check_self(p, "take")
  return atomically(take_now, p)
end

--- Where call id is in the pool's lists: k > 0 in results, -k in errors,
-- or nil. The index is built as far as the lists go, once per entry.
local function find(env, id)
  local index = env.index
  if not index then
    index = {}
    env.index, env.indexed_results, env.indexed_errors = index, 0, 0
  end
  local ids, errors = env.ids, env.errors
  for k = env.indexed_results + 1, #ids do index[ids[k]] = k end
  env.indexed_results = #ids
  for k = env.indexed_errors + 1, #errors do index[errors[k].id] = -k end
  env.indexed_errors = #errors
  return index[id]
end

--- The outcome of call id if it is in the pool's store: true and every
-- value, or false and the error record; nothing otherwise. Without
-- keep_results the store keeps it no more.
local function outcome(env, id)
  if env.keep_results then
    local k = find(env, id)
    if not k then return end
    if k < 0 then return false, env.errors[-k] end
    local ex = env.extras[id]
    if ex then return true, unpack(ex, 1, ex.n) end
    return true, env.results[k]
  end
  local e = env.unclaimed[id]
  if e == nil then return end
  env.unclaimed[id] = nil
  if getmetatable(e) == ERROR_MT then return false, e end
  return true, unpack(e, 1, e.n)
end

--- True when call id's outcome is in the pool's store.
local function has_outcome(env, id)
  if env.keep_results then return find(env, id) ~= nil end
  return env.unclaimed[id] ~= nil
end

--- The outcome of call id, which is in the store, handed over (run
-- deferred: without keep_results the store keeps it no more).
local function hand_over(p, env, id)
  done_waiting(p)
  return outcome(env, id)
end

--- p:result(id [, timeout]) -> true, v1, v2, ... (every value the call
-- returned) or false, err (its error record); nil, "timeout" when timeout
-- seconds passed first.
function methods.result(p, id, timeout)
  check_self(p, "result")
  if pool_stopped(p) then
    -- What the store holds is the script's still, as p.results and
    -- p:take() give it; nothing else can come.
    local env = pool_env(p)
    if type(id) == "number" and has_outcome(env, id) then return atomically(hand_over, p, env, id) end
    error(format("result: the pool is stopped, and call %s has no outcome in its store (aborted, handed "
      .. "out, a map's or a stream's, or no call)", tostring(id)), 2)
  end
  local calls = pool_counts(p)
  if type(id) ~= "number" or id < 1 or id > calls or id ~= floor(id) then
    error(format("result: no call has id %s (ids go from 1 to %d)", tostring(id), calls), 2)
  end
  check_timeout("result", "timeout", timeout)
  finish_moves(p) -- (a claim left half-moved still names its calls)
  if claimed(p, id) then error(format("result: call %d belongs to a map or a stream", id), 2) end
  local deadline = timeout and now() + timeout
  local env = pool_env(p)
  while true do
    pool_drain(p)
    if has_outcome(env, id) then return atomically(hand_over, p, env, id) end
    if pool_finished(p, id) then
      -- (a map or stream that has ended no longer knows its calls, and
      -- the pool does not remember which handed out what)
      error(format("result: call %d was handed out already (by %sp:take(), or by the map or "
        .. "stream it belonged to)", id, env.keep_results and "" or "an earlier p:result(), "), 2)
    end
    local _, finished = pool_counts(p)
    local status = wait_for(p, "progress", deadline, finished + 1)
    if status == "timeout" then
      done_waiting(p)
      return nil, "timeout"
    end
    check_status(p, status)
  end
end

-- map -----------------------------------------------------------------------

--- The message a map raises for its item i that failed with error record e.
local function item_failed(who, i, e)
  local tb = tostring(e.traceback or "")
  -- (the parent's own errors, a timeout or max_deaths, have no traceback)
  return format("%s: item %d failed: %s%s", who, i, tostring(e.message), tb ~= "" and "\n" .. tb or "")
end

--- What a map (`who`) raises for err, which ended its work: a bare lack of
-- memory says whose, and where its calls went.
local function map_error(who, err)
  if err == "not enough memory" then
    return who .. ": not enough memory (what its calls answered goes to the pool's results, as after any "
      .. "error it raises)"
  end
  return err
end

--- Releases a map's claim after the map consumed what it reports or
-- returns: a release short of memory is left to stop (the claim stays
-- running, what it did not move is kept), anything else is a fault and is
-- raised (after `failure`, the map's own message, when there is one).
local function release_after_map(p, claim, failure)
  local released, err = pcall(release, p, claim)
  if released or err == "not enough memory" then return end
  error((failure and failure .. "\n" or "") .. "map: its claim could not be released: " .. tostring(err), 0)
end

--- Raises the error that kept item k of a map or stream (`who`) from being
-- queued (core.pool_submit_each returns it): naming the item when it was
-- at fault (it cannot be encoded, or is above max_message), else as it
-- came (Ctrl-C, a stopped pool).
local function raise_unsent(who, k, err)
  if type(err) == "string" and (err:find("^cannot encode") or err:find("^cannot queue the call")) then
    error(format("%s: item %d cannot be sent: %s", who, k, err), 0)
  end
  caller.reraise(err)
end

-- Maps in chunks (chunks.lua) share the claims, waits and messages.
local chunks = require("parallelize.chunks").bind({
  new_claim = new_claim, release = release, wait_for = wait_for, check_status = check_status,
  done_waiting = done_waiting, item_failed = item_failed, raise_unsent = raise_unsent, map_error = map_error,
  release_after_map = release_after_map,
})
chunk_register, chunk_restore, chunk_stored = chunks.register, chunks.restore, chunks.stored

local function concat2(a, b) return a .. b end

--- Runs p(list[i]) for every i; returns the first results in input order
-- (null for nil). `who` names the caller in errors.
function M.map(p, list, who)
  local n = #list
  if n > 1 and pool_env(p).map_chunks then return chunks.map(p, list, n, who) end
  local claim = new_claim(p)
  local lists = claim.lists
  local first, last, pos
  claim.owns = function(id) return pos == nil or pos[id] ~= nil end
  local tag = claim.tag
  local function work()
    if n == 0 then return end
    local ids = {}
    local interleaved, err, bad
    first, last, interleaved, err, bad = pool_submit_each(p, tag, list, 1, n, ids)
    claim.first, claim.last = first, last
    if err then raise_unsent(who, bad, err) end
    if interleaved then
      -- Another call took an id in between (Lua code that ran inside
      -- p(...)): ids are looked up.
      pos = {}
      for k = 1, n do pos[ids[k]] = k end
    end
    while #lists.ids + #lists.errors < n and #lists.errors == 0 do
      local _, finished = pool_counts(p)
      local status = wait_for(p, "progress", nil, finished + n - #lists.ids - #lists.errors)
      if #lists.errors == 0 then check_status(p, status) end
    end
  end
  -- Whatever ended the work (its end, an error, Ctrl-C), this runs after
  -- it, deferred: the claim is released and the results reach the caller.
  local function settle(ok, err)
    done_waiting(p)
    local failure, out
    -- Short of memory, what is marked consumed (ke, kr) is what reaches the
    -- caller: the message, or the output, is made first, and a release that
    -- runs out halfway is left to stop (the claim stays running) while the
    -- caller still gets it. (Released first, the failure reported lost its
    -- call when its message could not be made: the store skipped it.)
    if not ok then
      release(p, claim)
    elseif #lists.errors > 0 then
      local e = lists.errors[1]
      -- (each step protected: short of memory for the message, nothing is
      -- marked reported, all goes to the store and the map says whose
      -- lack of memory it was; unprotected, it raised a bare "not enough
      -- memory" and left every call in the claim, for stop)
      local made, at = pcall(caller.where) -- (pcall adds a C level: ours are skipped all the same)
      local text
      if made then made, text = pcall(item_failed, who, pos and pos[e.id] or e.id - first + 1, e) end
      if made then made, failure = pcall(concat2, at, text) end
      if made then
        claim.ke = 2 -- reported: the rest go to the store
        release_after_map(p, claim, failure)
      else
        ok, err, failure = false, "not enough memory", nil
        release_after_map(p, claim)
      end
    else
      out = {}
      local results, ids = lists.results, lists.ids
      if pos then
        for k = 1, n do out[pos[ids[k]]] = results[k] end
      else
        for k = 1, n do out[ids[k] - first + 1] = results[k] end
      end
      claim.kr = n + 1
      release_after_map(p, claim)
    end
    -- As chunks.map does: the closures above may outlive the map in
    -- compiled traces, and must not keep its list, its answers or the pool.
    list, lists, pos, claim, p = nil, nil, nil, nil, nil -- luacheck: ignore
    if not ok then caller.reraise(map_error(who, err)) end
    if failure then error(failure, 0) end
    return out
  end
  return settle_after(work, settle)
end

--- p:map(list) -> the first result of p(list[i]) for every i, in input
-- order (null for nil). Raises on the first error, with the item's index,
-- the message and the traceback.
function methods.map(p, list)
  check_self(p, "map")
  if pool_stopped(p) then error("map: the pool is stopped", 2) end
  if type(list) ~= "table" then error("map: list must be an array (got " .. describe(list) .. ")", 2) end
  return M.map(p, list, "map")
end

-- stream --------------------------------------------------------------------

--- p:stream(src [, {ordered =, max_pending =}]) -> an iterator for a generic
-- for: i, true, v1, v2, ... or i, false, err for each input i (its
-- position in src: an array, or a function returning the next input and
-- nil at the end), in completion order or, with ordered, in input order.
-- At most max_pending inputs wait for a worker at a time. By default the
-- window starts as what the workers hold while no backlog deepens them,
-- max_inflight each but at most 256, and at least 64 in all: until results
-- have told their size, the window alone bounds the results that can pile
-- up, and 16384 per worker, the default max_inflight, would let results of
-- a MiB hold 128 GiB. Once SIZED results have been handed out, all of them
-- numbers, booleans, nil or strings (whose bytes bound the calls out, see
-- refill), it widens to what the workers may hold (max_inflight each), and
-- narrows back at the first other result (a table, an error, several
-- values): with tiny calls the narrow window left the workers short, and
-- a stream ran at 1.5-5.7 M results a second from round to round, against
-- 4.8-5.9 with the wide one (the p(i) loop: 7.2-9.0). With ordered,
-- at most that many results are held back too. And at most four times that
-- many inputs are between src and the loop's body (queued, running, or
-- finished and not yet handed out): a loop slower than the workers pulls
-- src no faster than it consumes, so results never pile up in memory.
-- (Twice was too tight: results arrive in batches, and a batch handed out
-- one by one kept the workers waiting; a quarter of the throughput went.)
function methods.stream(p, src, opts)
  check_self(p, "stream")
  if pool_stopped(p) then error("stream: the pool is stopped", 2) end
  local t = type(src)
  if t ~= "table" and t ~= "function" then
    error("stream: src must be an array or an iterator function (got " .. describe(src) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("stream: options must be a table (got " .. describe(opts) .. ")", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "ordered" and k ~= "max_pending" then
      error(format("stream: unknown option %s (the options are max_pending, ordered)", tostring(k)), 2)
    end
  end
  local window = opts.max_pending or pool_env(p).max_pending
  if window ~= nil then options.check_value("stream", "max_pending", window, 2) end
  -- narrow, wide: the default window's two sizes (see above), nil when
  -- max_pending was given; bulky: a result was not a number, a boolean,
  -- nil or a string.
  local narrow, wide, bulky
  if window == nil then
    local inflight = pool_env(p).max_inflight
    narrow = math.max(64, math.min(inflight, 256) * pool_size(p))
    wide = math.max(narrow, inflight * pool_size(p))
    window = narrow
  end
  local ordered = opts.ordered and true or false
  local tty_bar = pool_env(p).bar and pool_env(p).bar.tty

  local claim = new_claim(p)
  local lists, tag = claim.lists, claim.tag
  -- Collected with the iterator: the stream can no longer be stepped, and
  -- its claim may go to the store (release_abandoned). finish() lets go of
  -- it, the claim released.
  local guard = newproxy(true)
  do
    local c = claim
    getmetatable(guard).__gc = function() c.abandoned = true end
  end
  local array_n = t == "table" and #src or nil
  -- Numbers and short strings are queued through the FFI while the JIT
  -- runs (p(x)'s fast path: interpreted, the FFI costs more than the C
  -- API), one at a time: a C function called from a compiled loop ends
  -- its trace (a stream from an iterator paid that for every input).
  local fast = jit_status() and fast_of[p] or nil
  -- starved: the source had no input ready when last asked (it returned
  -- parallelize.later); the stream's waits then end soon, to ask again.
  local next_i, exhausted, starved = 1, false, false
  -- What a hand-out moves, in the claim, so that its core.commit moves it
  -- with the result (ldefer.c): claim.kr and claim.ke (the next result
  -- and error in the claim's lists), and with ordered, claim.want (the
  -- input whose result is handed out next). Everything else is derived
  -- from them, so that a hand-out has one assignment to make (with three,
  -- the main thread spent a fifth more time per result, in C API calls,
  -- with a short executor): handed_out() and outstanding() below;
  -- kbase and ebase, the results and errors handed out before the lists'
  -- last compaction (compact); moved, the results moved to `held`
  -- (ordered); and kcounted, the position in lists.ids up to which the
  -- runs' counts of calls left (segs) are settled (settle_runs).
  claim.want, claim.kbase, claim.ebase, claim.moved, claim.kcounted = 1, 0, 0, 0, 1
  -- id -> input position, as runs of consecutive ids: segs[s] is
  -- {id0, i0, count, left}, for s from seg_head to seg_tail. A run is
  -- dropped once all its calls are handed out (left = 0), unless it is the
  -- last, which the next input may extend.
  local segs, seg_head, seg_tail = {}, 1, 0
  -- With ordered, what finished before its input's turn, in slot
  -- (i - 1) % ring + 1 for input i: held[slot] is the first value (null
  -- for nil) or the error record; held_more[slot] nil, or every value
  -- ({n =, ...}) when there are not exactly one non-nil, or FAILED for an
  -- error; held_id[slot] the call's id (left behind once handed out). No
  -- table per result, and slots rather than positions as keys: the inputs
  -- held back are between want and next_i, fewer than 4 * window apart
  -- (refill; the widest window), so they never share a slot, and the
  -- tables stay arrays however long the stream.
  local ring = 4 * (wide or window)
  local held, held_more, held_id = {}, {}, {}
  -- How many more results step may hand out without looking at the
  -- workers' queue (pool_counts): a C call per result cost more than the
  -- rest of the turn. The queue is refilled below half the window, and
  -- an eighth of the window handed out meanwhile still leaves the workers
  -- more than a third of it. 0 sends every turn through the full step.
  local look_every = math.max(1, floor(window / 8))
  local quick_turns = 0
  -- The strings handed out so far, and their bytes: once SIZED of them
  -- have been, with big strings for results, the calls outstanding are
  -- also kept to about max_pending_bytes of results (refill). Counted by
  -- the count of calls alone, 4 * window results of 1 MiB held a GiB while
  -- the loop's body waited on a slow pipe (pzlua --map; 200 MB now).
  local strings, string_bytes = 0, 0
  local result_bytes = pool_env(p).max_pending_bytes
  -- (two per worker at least, within 4 * window all the same: see refill)
  local min_outstanding = 2 * pool_size(p)
  claim.owns = function(id)
    for s = seg_head, seg_tail do
      local seg = segs[s]
      if id >= seg[1] and id < seg[1] + seg[3] then return true end
    end
    return false
  end

  --- Results and errors handed out so far.
  local function handed_out()
    if ordered then return claim.want - 1 end
    return claim.kbase + claim.kr - 1 + claim.ebase + claim.ke - 1
  end

  --- Inputs submitted and not handed out yet.
  local function outstanding()
    return next_i - 1 - handed_out()
  end

  --- Results held back (ordered).
  local function nheld()
    return claim.moved - (claim.want - 1)
  end

  --- Drops the runs at the head whose calls are all handed out: as far as
  -- their counts are settled (settle_runs).
  local function drop_spent_runs()
    -- (the head moves first: an interrupt between the two leaves a spent
    -- run behind it, never a hole between head and tail, which claim.owns
    -- would index)
    while seg_head < seg_tail and segs[seg_head][4] == 0 do
      seg_head = seg_head + 1
      segs[seg_head - 1] = nil
    end
  end

  --- position() for a call of a run after the first.
  local function position_in_later_run(id)
    drop_spent_runs()
    for s = seg_head, seg_tail do
      local seg = segs[s]
      if id >= seg[1] and id < seg[1] + seg[3] then return seg[2] + (id - seg[1]), seg end
    end
    error("stream: internal error: call " .. id .. " is not the stream's")
  end

  --- The input position of call id, and its run, whose count of ids left
  -- an error's hand-out lowers (in its commit: an interrupt before it
  -- changes nothing) and a result's is lowered later (settle_runs). Its
  -- calls come mostly from the first run (all of them, when nothing else
  -- queues calls on the pool meanwhile): looked up with no loop. Spent
  -- runs are dropped on the way to a later one.
  local function position(id)
    local seg = segs[seg_head]
    local d = id - seg[1]
    if d < 0 or d >= seg[3] then return position_in_later_run(id) end
    return seg[2] + d, seg
  end

  --- Notes that inputs next_i .. next_i + count - 1 became calls
  -- id0 .. id0 + count - 1.
  local function submitted(id0, count)
    local seg = segs[seg_tail]
    if seg and id0 == seg[1] + seg[3] then
      seg[3], seg[4] = seg[3] + count, seg[4] + count
    else
      segs[seg_tail + 1] = { id0, next_i, count, count } -- (then the tail: as above)
      seg_tail = seg_tail + 1
      -- the last run may have been spent: no longer last, it goes, so
      -- that the new one's calls are found at the head
      drop_spent_runs()
    end
    if not claim.first then claim.first = id0 end
    claim.last = id0 + count - 1
    next_i = next_i + count
  end

  local ids = {}
  local refilling = false -- (see refill)

  --- Queues inputs while fewer than `window` wait for a worker (pending,
  -- if the caller has just read it), fewer than `window` results are held
  -- back (when ordered) and fewer than `4 * window` are outstanding: an
  -- array's in one C call.
  local function refill_now(pending)
    if exhausted then return end
    if wide then
      -- The default window's size (see the top).
      local want = (bulky or handed_out() < SIZED) and narrow or wide
      if want ~= window then
        window = want
        look_every = math.max(1, floor(window / 8))
      end
    end
    if not pending then pending = select(3, pool_counts(p)) end
    local most = 4 * window
    if strings >= SIZED then
      local by_bytes = floor(result_bytes * strings / string_bytes)
      -- (two per worker at least, but never past four times the window:
      -- an ordered stream's ring holds that many, and with a window below
      -- half the workers, input k + ring took input k's slot)
      most = math.min(most, math.max(by_bytes, min_outstanding))
    end
    local room = math.min(window - pending, window - nheld(), most - outstanding())
    if room <= 0 then return end
    if array_n then
      local last_i = math.min(next_i + room - 1, array_n)
      while next_i <= last_i do
        local id = fast and fast_submit_tagged(fast, tag, src[next_i])
        if id then
          submitted(id, 1)
        else
          -- Through C, the rest of this turn's inputs in one call (one
          -- a turn, as the fast way resumes at the next turn: a C call
          -- for each input it declines would cost what it saves).
          local first, last, interleaved, err, bad = pool_submit_each(p, tag, src, next_i, last_i, ids)
          -- When item `bad` could not be queued, those before it were: the
          -- stream notes them before it raises (their results are its own).
          local queued = (bad or last_i + 1) - next_i
          if queued > 0 and interleaved then
            for k = 1, queued do submitted(ids[k], 1) end
          elseif queued > 0 then
            submitted(first, last - first + 1)
          end
          if err then
            refilling = false -- (every call queued is noted: stepped again, it goes on to this input)
            raise_unsent("stream", bad, err)
          end
        end
      end
      exhausted = next_i > array_n
      return
    end
    starved = false
    for _ = 1, room do
      local item = src()
      -- A source that stepped this stream (the step saw `refilling`, raised
      -- STREAM_BROKEN and ended the stream: finish() let go of the claim
      -- and its lists) and caught that error: the loop raised "attempt to
      -- index upvalue 'claim'" below, which said nothing of what failed.
      if not claim then error(STREAM_SELF_STEPPED, caller.level()) end
      if item == nil then
        exhausted = true
        return
      end
      if item == LATER then
        starved = true
        return
      end
      -- The source may have stopped the pool: said as the stream says it
      -- (not as pool_submit would, at a line of this file).
      if claim.tag_released then
        error(STREAM_STOPPED, caller.level())
      end
      submitted(fast and fast_submit_tagged(fast, tag, item) or pool_submit(p, tag, nil, item), 1)
    end
  end

  -- Between a call queued and submitted() noting it, and between src()
  -- returning an input and its call, the stream's positions are not the
  -- calls': an error or Ctrl-C raised from there (the source's error, an
  -- input that cannot be sent, an interrupt) leaves `refilling` set, and a
  -- stream stepped again after that would hand out results at the wrong
  -- positions, queue an input twice, or raise an internal error. It ends
  -- instead (full_step). Interrupts elsewhere (a wait, a hand-out) leave
  -- the stream whole, and stepped again it goes on; so does an array's
  -- input that cannot be sent (those before it are noted first).
  local function refill(pending)
    -- (hand-outs go through full_step until it has set quick_turns again)
    quick_turns = 0
    refilling = true
    refill_now(pending)
    refilling = false
  end

  -- The hand-outs. Each ends in one core.commit, a tail call: the read
  -- position moves past a result in the same C call that returns it, so
  -- that Ctrl-C lands before (the result stays in the claim's lists or in
  -- `held`, and goes to the pool's store if the stream is abandoned) or
  -- after (the caller has it), never between.

  --- Notes the kind of a result about to be handed out: its first value v,
  -- and whether it has others (or is an error): the string bytes and
  -- `bulky` that size the window (refill).
  local function note_result(v, more)
    local tv = type(v)
    if tv == "string" then
      strings, string_bytes = strings + 1, string_bytes + #v
    elseif more or (tv ~= "number" and tv ~= "boolean" and v ~= null) then
      bulky = true
    end
  end

  --- Call k of the claim's lists, finished with call id: i, true, values...
  local function take_result(k, id)
    local i = position(id)
    local v = lists.results[k]
    local ex = lists.extras[id]
    note_result(v, ex)
    if ex then
      return commit(2, claim, "kr", k + 1, lists.extras, id, nil, i, true, unpack(ex, 1, ex.n))
    end
    return commit(1, claim, "kr", k + 1, i, true, v)
  end

  --- The next failed call in the claim's lists: i, false, its error record.
  local function take_error()
    bulky = true
    local k = claim.ke
    local e = lists.errors[k]
    local i, seg = position(e.id)
    return commit(2, claim, "ke", k + 1, seg, 4, seg[4] - 1, i, false, e)
  end

  --- Drops the consumed part of the claim's lists now and then, so that a
  -- long stream runs in constant memory. The lists dropped are cleared
  -- and come back at the next compaction, their arrays kept: new lists
  -- grew anew each time, and a 2 M-result stream spent about a third of
  -- its main thread's time in the kernel, touching fresh memory and
  -- unmapping what it dropped.
  local spare_results, spare_ids = {}, {}

  --- Lowers the counts of calls left of the runs (segs) by the results
  -- handed out since the last time, kcounted to kr: the hand-out leaves
  -- that to this. Deferred (settle_runs).
  local function settle_runs_now()
    local ids_ = lists.ids
    for k = claim.kcounted, claim.kr - 1 do
      local _, seg = position(ids_[k])
      seg[4] = seg[4] - 1
    end
    claim.kcounted = claim.kr
  end

  --- settle_runs_now, deferred: an interrupt halfway would count some
  -- twice. Once a full turn (every eighth of the window) and before a
  -- compaction: until then the spent runs stay, and position() may look
  -- through them.
  local function settle_runs()
    if not ordered and claim.kcounted < claim.kr then atomically(settle_runs_now) end
  end

  local function compact_results_now()
    settle_runs_now()
    local spent_results, spent_ids = lists.results, lists.ids
    lists.results, lists.ids = spare_results, spare_ids
    claim.kbase, claim.kr, claim.kcounted = claim.kbase + claim.kr - 1, 1, 1
    clear_table(spent_results)
    clear_table(spent_ids)
    spare_results, spare_ids = spent_results, spent_ids
  end

  local function compact()
    if claim.kr > 1024 and claim.kr > #lists.ids then atomically(compact_results_now) end
    if claim.ke > 1024 and claim.ke > #lists.errors then
      commit(3, lists, "errors", {}, claim, "ke", 1, claim, "ebase", claim.ebase + claim.ke - 1)
    end
  end

  --- Holds back call id's answer until its input's turn: v and more as
  -- in `held` and `held_more`.
  local function hold(id, v, more)
    local i, seg = position(id)
    local slot = (i - 1) % ring + 1
    held[slot], held_more[slot], held_id[slot] = v, more, id
    seg[4] = seg[4] - 1
    claim.moved = claim.moved + 1
  end

  --- Moves the finished calls from the claim's lists to `held` (ordered).
  -- Run deferred (hold_finished), all that came at once.
  local function hold_finished_now()
    local ids_, results, extras = lists.ids, lists.results, lists.extras
    while true do
      local k = claim.kr
      local id = ids_[k]
      if id == nil then break end
      local ex = extras[id]
      if ex then extras[id] = nil end
      hold(id, results[k], ex)
      claim.kr, claim.kcounted = k + 1, k + 1
    end
    while true do
      local k = claim.ke
      local e = lists.errors[k]
      if e == nil then break end
      hold(e.id, e, FAILED)
      claim.ke = k + 1
    end
  end

  local function hold_finished()
    if lists.ids[claim.kr] ~= nil or lists.errors[claim.ke] ~= nil then atomically(hold_finished_now) end
  end

  --- With ordered, hands out what input `want` gave, held back (held[slot]
  -- is not nil).
  local function take_held(slot)
    local want, v, more = claim.want, held[slot], held_more[slot]
    note_result(v, more)
    if more == nil then
      return commit(2, held, slot, nil, claim, "want", want + 1, want, true, v)
    end
    if more == FAILED then
      return commit(3, held, slot, nil, held_more, slot, nil, claim, "want", want + 1, want, false, v)
    end
    return commit(3, held, slot, nil, held_more, slot, nil, claim, "want", want + 1,
      want, true, unpack(more, 1, more.n))
  end

  -- What was held back goes to the pool's store if the stream is
  -- abandoned: it is no longer in the claim's lists (release), which
  -- takes {id =, first =, ex =} or {id =, err =}.
  claim.held_back = function()
    local list = {}
    for slot, v in pairs(held or {}) do
      local id, more = held_id[slot], held_more[slot]
      if more == FAILED then
        list[#list + 1] = { id = id, err = v }
      else
        list[#list + 1] = { id = id, first = v, ex = more }
      end
    end
    return list
  end

  local ended = false

  --- The closures above can outlive the stream: a compiled trace that
  -- called one keeps it, and with it what its upvalues hold, until the JIT
  -- flushes the trace (the same holds for p:map: chunks.lua). A stream
  -- that has ended lets go of its source, what it held back, its claim's
  -- lists and the pool: a dropped pool must still be collected (and its
  -- workers stopped).
  local function finish()
    release(p, claim)
    done_waiting(p)
    ended = true
    quick_turns = 0
    src, held, held_more, held_id, segs, ids, lists, claim, p = nil, nil, nil, nil, nil, nil, nil, nil, nil
    -- (guard: this reference is what keeps it alive as long as the loop's
    -- closures are)
    fast, spare_results, spare_ids, guard = nil, nil, nil, nil -- luacheck: ignore 311
  end

  --- A turn of the loop that may wait, refill or end the stream.
  local function full_step()
    if ended then return nil end
    if refilling then
      finish() -- (its results to the pool's store, as an abandoned stream's)
      error(STREAM_BROKEN, 2)
    end
    -- p:stop() moved what the stream had not handed out to the pool's
    -- store: handing it out too would give each result twice. A stream
    -- that had handed out everything (stopped from its loop's last turn)
    -- just ends. (Begun, not done: a stop whose move ran out of memory
    -- halfway has put some in the store already, and the next stop moves
    -- the rest.) A stop that raised before it moved this claim (short of
    -- memory) left the pool stopped and the claim whole: moved now.
    if claim.tag_released or pool_stopped(p) then
      if outstanding() == 0 and exhausted then
        finish()
        return nil
      end
      release(p, claim)
      error(STREAM_STOPPED, 2)
    end
    settle_runs()
    while true do
      -- Keep the workers fed before handing out results.
      if not exhausted then
        local _, _, pending = pool_counts(p)
        if pending < window / 2 then refill(pending) end
      end
      quick_turns = exhausted and math.huge or look_every
      if ordered then
        -- everything finished moves to `held`, which yields in order
        hold_finished()
        compact()
        local slot = (claim.want - 1) % ring + 1
        if held[slot] ~= nil then return take_held(slot) end
      else
        compact()
        local k = claim.kr
        local id = lists.ids[k]
        if id ~= nil then return take_result(k, id) end
        if lists.errors[claim.ke] ~= nil then return take_error() end
      end
      refill()
      if outstanding() == 0 and exhausted then
        finish()
        return nil
      end
      local _, finished, pending = pool_counts(p)
      local room = not exhausted and nheld() < window and pending >= window
      local status = wait_for(p, "progress", starved and now() + LATER_WAIT or nil, finished + 1,
        room and window or nil)
      if status ~= "timeout" then check_status(p, status) end
      -- The loop's body may print: a bar on a terminal is erased first.
      if tty_bar then done_waiting(p) end
    end
  end

  --- The loop's turn. Most turns have a result with one value at hand
  -- (in the claim's lists or, with ordered, held back for this turn) and
  -- need not look at the workers' queue: they are handed out here, with no
  -- loop and one C call (the commit).  Anything else goes through
  -- full_step.
  local function step()
    if quick_turns > 0 and not claim.tag_released then
      if ordered then
        local slot = (claim.want - 1) % ring + 1
        if held[slot] ~= nil and held_more[slot] == nil then
          quick_turns = quick_turns - 1
          return take_held(slot)
        end
      else
        local k = claim.kr
        local id = lists.ids[k]
        if id ~= nil then
          quick_turns = quick_turns - 1
          return take_result(k, id)
        end
      end
    end
    return full_step()
  end

  return step
end

-- Properties ----------------------------------------------------------------

--- Waits for every worker to initialize (or be given up), then returns
-- the copies of the initialized executors in worker order.
function properties.executors(p)
  if not pool_stopped(p) then
    wait_for(p, "init")
    -- (on a terminal, erased as any method's; written as lines, the bar
    -- keeps its last line for the end of the calls)
    local bar = pool_env(p).bar
    if bar and bar.tty then done_waiting(p) end
  end
  local env, list = pool_env(p), {}
  local execs = env.executors
  for i = 1, pool_size(p) do
    if execs[i] ~= nil then list[#list + 1] = execs[i] end
  end
  return list
end

--- The pid each slot's worker reported as it initialized, while that
-- process lives: one that has died (not replaced, or its replacement not
-- initialized yet) is left out, as its pid may be another process's by
-- now. After stop, the last ones.
function properties.pids(p)
  pool_drain(p)
  local c, alive = {}, not pool_stopped(p) and core.pool_slots_alive(p)
  for k, v in pairs(pool_env(p).pids) do
    if not alive or alive[k] then c[k] = v end
  end
  return c
end

function properties.size(p)
  return pool_size(p)
end

function properties.calls(p)
  return (pool_counts(p))
end

function properties.pending(p)
  pool_drain(p)
  local calls, finished = pool_counts(p)
  if pool_stopped(p) then return 0 end
  return calls - finished
end

function properties.stopped(p)
  return pool_stopped(p)
end

--- What each executor's close returned, by slot, after a graceful stop.
function properties.closed(p)
  pool_drain(p)
  local c = {}
  for k, v in pairs(pool_env(p).closed) do c[k] = v end
  return c
end

-- Control ---------------------------------------------------------------------

--- p:submit(options, ...) -> id: p(...) with options of its own for this
-- call: timeout (seconds; false for none, whatever the pool's).
function methods.submit(p, opts, ...)
  check_self(p, "submit")
  if type(opts) ~= "table" then
    error("submit: options must be a table (got " .. describe(opts) .. ")", 2)
  end
  for k in pairs(opts) do
    if k ~= "timeout" then error(format("submit: unknown option %s (the options are timeout)", tostring(k)), 2) end
  end
  local t = opts.timeout
  if t == false then
    t = math.huge
  elseif t ~= nil then
    options.check_value("submit", "timeout", t, 2)
  end
  if pool_stopped(p) then error("submit: the pool is stopped", 2) end
  return pool_submit(p, 0, t, ...)
end

--- p:cancel(id) -> whether the call was still unfinished: one not started
-- is dropped at once, a running one is ended with its worker; either
-- becomes an error record `call 17 cancelled` (err.cancelled = true).
function methods.cancel(p, id)
  check_self(p, "cancel")
  if type(id) ~= "number" then error("cancel: id must be a call id (got " .. describe(id) .. ")", 2) end
  if pool_stopped(p) then return false end
  return core.pool_cancel(p, id)
end

--- The calls per second finished over the last few seconds, from the I/O
-- thread's samples {{t, done}, ...} (the last one is now).
local function recent_rate(samples)
  local last = samples[#samples]
  local first = samples[1]
  for i = #samples, 1, -1 do
    if samples[i][1] >= last[1] - 5 then first = samples[i] end
  end
  local dt = last[1] - first[1]
  return dt > 0 and (last[2] - first[2]) / dt or 0
end

--- p:stats() -> a table of counts, rates, elapsed time and workers (see
-- docs/api.md).
function methods.stats(p)
  check_self(p, "stats")
  pool_drain(p)
  local s = core.pool_stats(p)
  local calls = pool_counts(p)
  local env = pool_env(p)
  -- After stop, what still waited, ran or was to run again after raising
  -- is in the aborted list: the I/O side keeps those frames (walked, not
  -- consumed, for a stop tried again) and their attempts, and would count
  -- them here too.
  local stopped = pool_stopped(p)
  return {
    calls = calls,
    done = s.done - s.failed,
    failed = s.failed,
    -- (from the calls the I/O side had taken when it counted the rest,
    -- not the count published for the main thread, which may be read
    -- later: calls taken in between were in neither pending nor running)
    pending = stopped and 0 or calls - s.taken - s.cancelled_unseen + s.requeued,
    running = stopped and 0 or s.running,
    aborted = env.aborted_count or 0,
    cancelled = s.cancelled,
    timeouts = s.timeouts,
    retries = s.retries,
    retrying = stopped and 0 or s.retrying,
    deaths = s.deaths,
    respawns = s.respawns,
    recycles = s.recycles,
    elapsed = s.elapsed,
    rate = s.elapsed > 0 and s.done / s.elapsed or 0,
    recent_rate = recent_rate(s.samples),
    workers = s.workers,
    shared = s.shared,
  }
end

pool_mt.__index = function(p, k)
  local m = methods[k]
  if m then return m end
  local prop = properties[k]
  if prop then return prop(p) end
  return nil
end

pool_mt.__newindex = function(_, k)
  error("cannot set field '" .. tostring(k) .. "' of a pool", 2)
end

--- Gives a new pool what the C core asks of the Lua layer: how it keeps
-- results, and how p(...) waits for room (max_pending).
function M.init(p, opts)
  local env = pool_env(p)
  if address_of then fast_of[p] = address_of(p) end
  env.keep_results = opts.keep_results
  env.max_pending = opts.max_pending
  env.max_inflight = opts.max_inflight
  env.max_pending_bytes = opts.max_pending_bytes
  env.fail_fast = opts.fail_fast
  -- A map goes in chunks only where a chunk behaves as its items' calls
  -- would, one by one: no timeout or retries to apply to each, no
  -- max_calls to count them, no fail_fast or progress bar to report each.
  env.map_chunks = not (opts.timeout or (opts.retries or 0) > 0 or opts.max_calls
    or opts.fail_fast or opts.progress)
  env.bar = progress.new(opts.progress)
  env.wait_room = M.wait_room
  env.chunks, env.chunk_tags, env.chunk_answer = {}, {}, chunks.stored
  return p
end

return M
