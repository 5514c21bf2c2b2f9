-- A snippet, not a script: scripts.py puts it where a script says "-- INCLUDE: _bmqueue".
-- An item of a later batch of a batch map waits in bmqueue as one string "ITEM\nPAYLOAD"
-- (an item id holds no newline).

local function queued_entry(item, payload)
  return item .. '\n' .. payload
end

-- The item id and payload JSON of a queued entry.
local function split_entry(entry)
  local cut = string.find(entry, '\n', 1, true)
  return string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
end
