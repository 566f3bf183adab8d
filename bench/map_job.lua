--- The job of the `pzlua --map` benchmark (bench/mapcli.lua): one JSON
-- record in, the same record with its total and its name in capitals out.
-- One file serves every system compared, so that each runs the same Lua:
--
--   pzlua --map bench/map_job.lua:transform < in > out
--       loaded by each worker (which has no global `arg`): the table
--   luajit bench/map_job.lua RECORD
--       one record given as an argument (GNU parallel, xargs: a process
--       per line)
--   luajit bench/map_job.lua < in > out
--       every line of stdin (GNU parallel --pipe: a process per block)
local cjson = require "cjson"

local M = {}

function M.transform(r)
  r.total = r.price * r.qty
  r.name = r.name:upper()
  return r
end

-- Loaded as a file executor: no script arguments, no `arg`.
if arg == nil then return M end

local encode, decode, transform = cjson.encode, cjson.decode, M.transform
if arg[1] then
  io.write(encode(transform(decode(arg[1]))), "\n")
else
  for line in io.lines() do
    io.write(encode(transform(decode(line))), "\n")
  end
end
