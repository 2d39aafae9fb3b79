-- The port watcher: parsing /proc/net/tcp and tcp6 text, owner lookup,
-- change detection, and a real listener opened by the spec.
local core = require("justavps.core")
local helpers = require("support.helpers")
local ports = require("justavps.daemon.ports")

local async = helpers.async

local HEADER4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
  .. "retrnsmt   uid  timeout inode\n"
local HEADER6 = "  sl  local_address                         remote_address"
  .. "                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"

-- Lines in the kernel's format. Ports: 0x1F90 = 8080, 0x0016 = 22,
-- 0x0050 = 80, 0x0DAC = 3500.
local TCP4 = HEADER4
  .. "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 "
  .. "00000000  1000        0 111 1 0000000000000000 100 0 0 10 0\n"
  .. "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 "
  .. "00000000     0        0 222 1 0000000000000000 100 0 0 10 0\n"
  .. "   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 "
  .. "00000000  1000        0 333 1 0000000000000000 20 4 30 10 -1\n"
  .. "   3: 0A00020F:0050 00000000:0000 06 00000000:00000000 00:00000000 "
  .. "00000000     0        0 0 1 0000000000000000 100 0 0 10 0\n"
  .. "   4: 0101A8C0:0DAC 00000000:0000 0A 00000000:00000000 00:00000000 "
  .. "00000000     0        0 444 1 0000000000000000 100 0 0 10 0\n"

local TCP6 = HEADER6
  .. "   0: 00000000000000000000000000000000:0050 "
  .. "00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 "
  .. "00000000     0        0 555 1 0000000000000000 100 0 0 10 0\n"
  .. "   1: 00000000000000000000000001000000:1F90 "
  .. "00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 "
  .. "00000000  1000        0 666 1 0000000000000000 100 0 0 10 0\n"
  .. "   2: 0000000000000000FFFF00000100007F:0DAC "
  .. "00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 "
  .. "00000000  1000        0 777 1 0000000000000000 100 0 0 10 0\n"
  .. "   3: 000080FE00000000000000000100000A:0016 "
  .. "00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 "
  .. "00000000     0        0 888 1 0000000000000000 100 0 0 10 0\n"
  .. "   4: B80D0120000000000000000001000000:0016 "
  .. "000080FE00000000000000000100000A:C350 01 00000000:00000000 00:00000000 "
  .. "00000000     0        0 999 1 0000000000000000 100 0 0 10 0\n"


local function find_port(list, port, address)
  for _, e in ipairs(list) do
    if e.port == port and (not address or e.address == address) then
      return e
    end
  end
  return nil
end


describe("ports.parse", function()
  it("keeps IPv4 listeners only", function()
    local list = ports.parse(TCP4)
    assert.equal(3, #list)
    assert.same({ port = 8080, address = "127.0.0.1", family = "ipv4",
      inode = 111 }, list[1])
    assert.same({ port = 22, address = "0.0.0.0", family = "ipv4",
      inode = 222 }, list[2])
    assert.same({ port = 3500, address = "192.168.1.1", family = "ipv4",
      inode = 444 }, list[3])
  end)

  it("formats IPv6 addresses", function()
    local list = ports.parse(TCP6)
    assert.equal(4, #list)
    assert.same({ port = 80, address = "::", family = "ipv6", inode = 555 }, list[1])
    assert.same({ port = 8080, address = "::1", family = "ipv6", inode = 666 }, list[2])
    assert.same({ port = 3500, address = "::ffff:127.0.0.1", family = "ipv6",
      inode = 777 }, list[3])
    assert.same({ port = 22, address = "fe80::a00:1", family = "ipv6",
      inode = 888 }, list[4])
  end)

  it("skips malformed lines", function()
    local list = ports.parse(HEADER4 .. "garbage\n   0: 0100007F:1F90 nonsense\n\n")
    assert.equal(0, #list)
  end)
end)


describe("ports.parse_owner_lines", function()
  it("maps inodes to the lowest pid", function()
    local owners = ports.parse_owner_lines(
      "/proc/300/fd/4 socket:[111]\n/proc/12/fd/7 socket:[111]\n"
      .. "/proc/55/fd/3 socket:[222]\n/proc/55/fd/9 pipe:[1]\n")
    assert.equal(12, owners[111])
    assert.equal(55, owners[222])
    assert.is_nil(owners[1])
  end)
end)


describe("ports.diff", function()
  it("reports added and removed entries", function()
    local old = ports.parse(TCP4)
    local new = ports.parse(TCP6)
    new[#new + 1] = old[1]
    local added, removed = ports.diff(old, new)
    assert.equal(4, #added)
    assert.equal(2, #removed)
    assert.equal(22, removed[1].port)
    assert.equal(3500, removed[2].port)
  end)

  it("reports nothing for equal lists", function()
    local added, removed = ports.diff(ports.parse(TCP4), ports.parse(TCP4))
    assert.equal(0, #added)
    assert.equal(0, #removed)
  end)
end)


describe("ports.scan", function()
  it("reads a fixed proc tree", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/net") == 0)
    local f = assert(io.open(dir .. "/net/tcp", "w"))
    f:write(TCP4)
    f:close()
    f = assert(io.open(dir .. "/net/tcp6", "w"))
    f:write(TCP6)
    f:close()

    local list = ports.scan({ proc_dir = dir, owners = false })
    os.execute("rm -rf " .. dir)
    assert.equal(7, #list)
    assert.equal(22, list[1].port)
    assert.equal(22, list[2].port)
    assert.equal("ipv4", list[1].family)
    assert.equal("ipv6", list[2].family)
  end)

  it("reads a large file as parse reads its text", function()
    -- Listeners among thousands of other lines, so that lines cross the
    -- reader's buffer boundaries, and a malformed line.
    local lines = { HEADER4 }
    for i = 1, 3000 do
      lines[#lines + 1] = ("%4d: 0100007F:%04X 0100007F:D2F0 01 "
        .. "00000000:00000000 00:00000000 00000000  1000        0 %d 1 "
        .. "0000000000000000 20 4 30 10 -1\n"):format(i, 1024 + i, 5000 + i)
      if i % 700 == 0 then
        lines[#lines + 1] = ("%4d: 0100007F:%04X 00000000:0000 0A "
          .. "00000000:00000000 00:00000000 00000000  1000        0 %d 1 "
          .. "0000000000000000 100 0 0 10 0\n"):format(i, 20000 + i, 9000 + i)
      end
    end
    lines[#lines + 1] = "   9: 0100007F:1F90 nonsense 0A\n"
    local text = table.concat(lines)
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/net") == 0)
    local f = assert(io.open(dir .. "/net/tcp", "w"))
    f:write(text)
    f:close()

    local list = ports.scan({ proc_dir = dir, owners = false })
    os.execute("rm -rf " .. dir)
    local expected = ports.parse(text)
    assert.equal(4, #expected)
    assert.equal(#expected, #list)
    for i, e in ipairs(expected) do
      local got = find_port(list, e.port, e.address)
      assert.truthy(got, "listener " .. i)
      assert.equal(e.inode, got.inode)
    end
  end)

  it("finds a real listener and its process", async(function()
    local listener = assert(core.tcp.listen({ host = "127.0.0.1", port = 0,
      on_accept = function(sock) sock:close() end }))
    local port = listener:port()
    local list = ports.scan()
    listener:close()

    local e = find_port(list, port, "127.0.0.1")
    assert.truthy(e, "port " .. port .. " not in the catalogue")
    assert.equal("ipv4", e.family)
    assert.is_number(e.inode)
    assert.equal(core.proc.getpid(), e.pid)
    assert.is_string(e.process)
  end, 20))
end)


describe("port watcher", function()
  after_each(function()
    ports.stop()
  end)

  it("reports a port opening and closing", async(function()
    local changes = {}
    local changed = core.waiter()
    ports.start({ interval = 0.1, on_change = function(added, removed)
      changes[#changes + 1] = { added = added, removed = removed }
      if changed:waiting() then
        changed:wake()
      end
    end })

    -- Wait for the first scan, which reports every port already open.
    local deadline = core.now() + 10
    while #changes == 0 and core.now() < deadline do
      changed:wait(0.5)
    end
    local before = #changes

    local listener = assert(core.tcp.listen({ host = "127.0.0.1", port = 0,
      on_accept = function(sock) sock:close() end }))
    local port = listener:port()

    local function seen(kind)
      for i = before + 1, #changes do
        if find_port(changes[i][kind], port, "127.0.0.1") then
          return true
        end
      end
      return false
    end

    deadline = core.now() + 10
    while not seen("added") and core.now() < deadline do
      changed:wait(0.5)
    end
    assert.is_true(seen("added"), "opening of port " .. port .. " not reported")
    local list = ports.catalogue()
    assert.truthy(find_port(list, port, "127.0.0.1"))
    assert.is_true(ports.watching())

    listener:close()
    deadline = core.now() + 10
    while not seen("removed") and core.now() < deadline do
      changed:wait(0.5)
    end
    assert.is_true(seen("removed"), "closing of port " .. port .. " not reported")
  end, 30))
end)
