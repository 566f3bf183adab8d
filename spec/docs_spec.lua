-- The examples of the documentation run as they are: every ```lua block of
-- docs/api.md and README.md is run with pzlua, and what it prints must match
-- its `--> ` comments, in order (tabs between printed values read as one
-- space).
local support = require "spec.support"

--- The lua code blocks of a Markdown file.
local function code_blocks(path)
  local text = assert(support.read(path), "cannot read " .. path)
  local blocks = {}
  for block in text:gmatch("```lua\n(.-)```") do blocks[#blocks + 1] = block end
  return blocks
end

--- The lines a block promises to print.
local function expected(block)
  local lines = {}
  for line in block:gmatch("[^\n]*") do
    local want = line:match("%-%-> (.*)$")
    if want then lines[#lines + 1] = want end
  end
  return lines
end

for _, doc in ipairs({ "docs/api.md", "README.md" }) do
  describe(doc, function()
    for i, block in ipairs(code_blocks(doc)) do
      local want = expected(block)
      if #want > 0 then
        it("example " .. i .. " prints what it says", function()
          local dir = support.tmpdir()
          finally(function() support.rmdir(dir) end)
          support.write(dir .. "/example.lua", block)
          local out, status = support.run("timeout 60 " .. support.quote(support.pzlua()) .. " "
            .. support.quote(dir .. "/example.lua"))
          assert.are.equal(0, status, out)
          local got = {}
          for line in out:gmatch("([^\n]*)\n") do got[#got + 1] = (line:gsub("\t", " ")) end
          assert.are.same(want, got)
        end)
      end
    end
  end)
end
