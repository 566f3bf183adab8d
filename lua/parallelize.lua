--- parallelize: run Lua calls in parallel worker processes.
-- The public API; the mechanism lives in the C module parallelize.core.
local core = require "parallelize.core"

local M = {
  _VERSION = "parallelize scm",
  null = core.null,
  encode = core.encode,
  decode = core.decode,
}

return M
