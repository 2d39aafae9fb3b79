-- justavps.auth.ticket: single-use, 60-second machine tickets and the
-- in-memory store that consumes them.
local core = require("justavps.core")
local ticket = require("justavps.auth.ticket")

local NOW = 1700000000


local function issue(slug, now)
  return assert(ticket.issue({ slug = slug or "pale-fox", user_id = 42,
    now = now or NOW }))
end


describe("ticket.issue", function()
  it("makes a 43-character ticket valid for 60 s", function()
    local issued = issue()
    assert.equal(43, #issued.ticket)
    assert.matches("^[A-Za-z0-9_-]+$", issued.ticket)
    assert.equal(core.crypto.hex_encode(core.crypto.sha256(issued.ticket)),
      issued.hash)
    assert.equal(NOW + 60, issued.expires)
    assert.equal("pale-fox", issued.slug)
    assert.equal(42, issued.user_id)
  end)

  it("makes a different ticket each time", function()
    assert.not_equal(issue().ticket, issue().ticket)
  end)

  it("accepts a shorter ttl but not a longer one", function()
    local issued = assert(ticket.issue({ slug = "pale-fox", user_id = "u1",
      ttl = 10, now = NOW }))
    assert.equal(NOW + 10, issued.expires)
    assert.has_error(function()
      ticket.issue({ slug = "pale-fox", user_id = 1, ttl = 61 })
    end, "ticket.issue: ttl must be a number above 0 and at most 60")
  end)

  it("raises on a bad slug or user", function()
    assert.has_error(function()
      ticket.issue({ slug = "Pale_Fox", user_id = 1 })
    end, "ticket.issue: slug must match [a-z0-9-]{3,40}")
    assert.has_error(function()
      ticket.issue({ slug = "pale-fox" })
    end, "ticket.issue: user_id must be a string or a number, got nil")
  end)
end)


describe("ticket.hash", function()
  it("hashes a ticket", function()
    local issued = issue()
    assert.equal(issued.hash, ticket.hash(issued.ticket))
  end)

  it("rejects text that is not a ticket", function()
    local values = { "", ("a"):rep(42), ("a"):rep(44), ("a"):rep(42) .. "=",
      false, 42 }
    for _, value in ipairs(values) do
      local hash, message, code = ticket.hash(value)
      assert.is_nil(hash)
      assert.equal("invalid_ticket", code)
      assert.equal("ticket must be 43 characters of [A-Za-z0-9_-]", message)
    end
  end)
end)


describe("ticket store", function()
  it("consumes a ticket once", function()
    local store = ticket.new_store()
    local issued = issue()
    assert.is_true(store:add(issued, NOW))

    local record = store:consume(ticket.hash(issued.ticket), "pale-fox",
      NOW + 1)
    assert.same({ slug = "pale-fox", user_id = 42, expires = NOW + 60 },
      record)

    local again, message, code = store:consume(issued.hash, "pale-fox",
      NOW + 2)
    assert.is_nil(again)
    assert.equal("invalid_ticket", code)
    assert.equal("ticket is unknown or used already", message)
  end)

  it("rejects an unknown ticket", function()
    local store = ticket.new_store()
    local _, _, code = store:consume(issue().hash, "pale-fox", NOW)
    assert.equal("invalid_ticket", code)
  end)

  it("expires a ticket after 60 s", function()
    local store = ticket.new_store()
    local issued = issue()
    assert(store:add(issued, NOW))
    local record, _, code = store:consume(issued.hash, "pale-fox", NOW + 60)
    assert.is_nil(record)
    assert.equal("ticket_expired", code)
    _, _, code = store:consume(issued.hash, "pale-fox", NOW)
    assert.equal("invalid_ticket", code)
  end)

  it("accepts a ticket just before expiry", function()
    local store = ticket.new_store()
    local issued = issue()
    assert(store:add(issued, NOW))
    assert.is_table(store:consume(issued.hash, "pale-fox", NOW + 59.999))
  end)

  it("burns a ticket presented for another machine", function()
    local store = ticket.new_store()
    local issued = issue()
    assert(store:add(issued, NOW))
    local record, message, code = store:consume(issued.hash, "other-box",
      NOW)
    assert.is_nil(record)
    assert.equal("wrong_slug", code)
    assert.equal("ticket was issued for another machine", message)
    local again, _, again_code = store:consume(issued.hash, "pale-fox", NOW)
    assert.is_nil(again)
    assert.equal("invalid_ticket", again_code)
  end)

  it("stops at its bound instead of evicting", function()
    local store = ticket.new_store({ max_entries = 3 })
    local kept = {}
    for i = 1, 3 do
      kept[i] = issue()
      assert.is_true(store:add(kept[i], NOW))
    end
    local ok, message, code = store:add(issue(), NOW + 1)
    assert.is_nil(ok)
    assert.equal("store_full", code)
    assert.equal("ticket store is full (3 live tickets)", message)
    assert.equal(3, store:size())

    -- Every live ticket still works.
    assert.is_table(store:consume(kept[1].hash, "pale-fox", NOW + 1))
    assert.is_true(store:add(issue(), NOW + 1))
  end)

  it("makes room once tickets expire", function()
    local store = ticket.new_store({ max_entries = 2 })
    assert(store:add(issue("pale-fox", NOW), NOW))
    assert(store:add(issue("pale-fox", NOW + 30), NOW + 30))
    local _, _, code = store:add(issue("pale-fox", NOW + 59), NOW + 59)
    assert.equal("store_full", code)

    assert.is_true(store:add(issue("pale-fox", NOW + 60), NOW + 60))
    assert.equal(2, store:size())
  end)

  it("sweeps expired tickets", function()
    local store = ticket.new_store()
    for i = 1, 5 do
      assert(store:add(issue("pale-fox", NOW + i), NOW + i))
    end
    assert.equal(0, store:sweep(NOW + 60))
    assert.equal(2, store:sweep(NOW + 62))
    assert.equal(3, store:size())
    assert.equal(3, store:sweep(NOW + 1000))
    assert.equal(0, store:size())
  end)

  it("rejects a duplicate add", function()
    local store = ticket.new_store()
    local issued = issue()
    assert(store:add(issued, NOW))
    local ok, _, code = store:add(issued, NOW)
    assert.is_nil(ok)
    assert.equal("duplicate_ticket", code)
  end)

  it("raises on misuse", function()
    local store = ticket.new_store()
    assert.has_error(function()
      store:add({ hash = "x" })
    end, "store:add: expected the table returned by ticket.issue")
    assert.has_error(function()
      store:consume(issue().hash)
    end, "store:consume: slug must be a string, got nil")
    assert.has_error(function()
      ticket.new_store({ max_entries = 0 })
    end, "ticket.new_store: max_entries must be a positive integer")
  end)
end)
