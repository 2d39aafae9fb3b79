-- justavps.proxy.forward on its common path, where req:forward_head
-- builds the upstream request head and res:relay_head writes the response
-- head in C: header filtering both ways (hop-by-hop, names listed in
-- Connection, repeated fields, case, set_headers and drop_headers) and
-- body framing. The upstream is a raw TCP server, so the specs see the
-- bytes exactly as the proxy sent them.
local core = require("justavps.core")
local helpers = require("support.helpers")
local raw = require("support.rawhttp")
local proxy = require("justavps.proxy")

local async = helpers.async

local OK_RESPONSE = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


-- Splits a head into its first line and a list of {name, value} in order.
local function parse_head(head)
  local first, rest = head:match("^([^\r\n]*)\r\n(.*)$")
  local fields = {}
  for name, value in rest:gmatch("([^:\r\n]+): ?([^\r\n]*)\r\n") do
    fields[#fields + 1] = { name, value }
  end
  return first, fields
end


-- Returns the values of every field named name (any case), in order.
local function values(fields, name)
  local found = {}
  for _, f in ipairs(fields) do
    if f[1]:lower() == name:lower() then
      found[#found + 1] = f[2]
    end
  end
  return found
end


-- Reads a request body framed as head says: Content-Length or chunked.
local function read_body(sock, head)
  local length = head:lower():match("\r\ncontent%-length: (%d+)")
  if length then
    return assert(sock:readn(tonumber(length)))
  end
  if not head:lower():find("\r\ntransfer%-encoding: chunked") then
    return ""
  end
  local parts = {}
  while true do
    local size = tonumber(assert(sock:readuntil("\r\n")):match("^%x+"), 16)
    if size == 0 then
      assert(sock:readuntil("\r\n"))
      break
    end
    parts[#parts + 1] = assert(sock:readn(size))
    assert(sock:readn(2))
  end
  return table.concat(parts)
end


-- Starts a raw upstream that stores each request head and body in seen
-- and answers with the bytes of response, then closes.
local function upstream(seen, response)
  return assert(core.tcp.listen({
    port = 0,
    on_accept = function(sock)
      sock:settimeout(5)
      local head = sock:readuntil("\r\n\r\n")
      if head then
        -- readuntil strips the delimiter, so the last field loses its
        -- CRLF.
        seen.head = head .. "\r\n"
        seen.body = read_body(sock, seen.head)
        sock:write(response or OK_RESPONSE)
      end
      sock:close()
    end,
  }))
end


-- Starts a server whose handler forwards to the upstream on port with the
-- options opts (host and port are filled in).
local function front(port, opts)
  opts = opts or {}
  opts.host = "127.0.0.1"
  opts.port = port
  opts.timeout = 5
  return assert(core.http.listen({
    port = 0,
    access_log = false,
    handler = function(req)
      return proxy.forward(req, opts)
    end,
  }))
end


-- Sends the raw request through a new front to a new upstream and returns
-- the upstream's view and the client's response.
local function exchange(request, opts, response)
  local seen = {}
  local up = upstream(seen, response)
  local srv = front(up:port(), opts)
  local sock = raw.connect(srv:port())
  assert(sock:write(request))
  local res = assert(raw.read_response(sock))
  sock:close()
  srv:close()
  up:close()
  proxy.close_pool()
  return seen, res
end


-- Like exchange, but returns the client's response head as received.
local function exchange_head(request, opts, response)
  local seen = {}
  local up = upstream(seen, response)
  local srv = front(up:port(), opts)
  local sock = raw.connect(srv:port())
  assert(sock:write(request))
  local head = assert(sock:readuntil("\r\n\r\n"))
  sock:close()
  srv:close()
  up:close()
  proxy.close_pool()
  return seen, head .. "\r\n"
end


describe("proxy forward request head", function()
  it("drops hop-by-hop fields", async(function()
    local seen = exchange("GET /a HTTP/1.1\r\nHost: app\r\n"
      .. "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
      .. "Trailer: X-T\r\nProxy-Connection: keep-alive\r\n"
      .. "Proxy-Authorization: Basic eDp5\r\nUpgrade: h2c\r\n"
      .. "X-Kept: 1\r\n\r\n")
    local first, fields = parse_head(seen.head)
    assert.equal("GET /a HTTP/1.1", first)
    for _, name in ipairs({ "connection", "keep-alive", "te", "trailer",
        "proxy-connection", "proxy-authorization", "upgrade" }) do
      assert.same({}, values(fields, name))
    end
    assert.same({ "1" }, values(fields, "x-kept"))
    assert.same({ "app" }, values(fields, "host"))
  end))

  it("drops fields named in Connection", async(function()
    local seen = exchange("GET / HTTP/1.1\r\nHost: app\r\n"
      .. "Connection: X-A ,x-b\r\nconnection: keep-alive, X-C\r\n"
      .. "x-a: 1\r\nX-B: 2\r\nX-c: 3\r\nX-D: 4\r\n\r\n")
    local _, fields = parse_head(seen.head)
    assert.same({}, values(fields, "x-a"))
    assert.same({}, values(fields, "x-b"))
    assert.same({}, values(fields, "x-c"))
    assert.same({ "4" }, values(fields, "x-d"))
  end))

  it("keeps repeated fields in order", async(function()
    local seen = exchange("GET / HTTP/1.1\r\nHost: app\r\nX-Multi: one\r\n"
      .. "Accept: */*\r\nx-multi: two\r\nX-MULTI: three\r\n\r\n")
    local _, fields = parse_head(seen.head)
    assert.same({ "one", "two", "three" }, values(fields, "x-multi"))
  end))

  it("keeps field names as received", async(function()
    local seen = exchange("GET / HTTP/1.1\r\nHost: app\r\n"
      .. "X-CamelCase: v\r\nx-lower: w\r\n\r\n")
    local _, fields = parse_head(seen.head)
    assert.same({ "Host", "app" }, fields[1])
    assert.same({ "X-CamelCase", "v" }, fields[2])
    assert.same({ "x-lower", "w" }, fields[3])
  end))

  it("replaces fields from set_headers in any case", async(function()
    local seen = exchange("GET / HTTP/1.1\r\nHost: app\r\n"
      .. "x-forwarded-for: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n"
      .. "Cookie: secret\r\n\r\n", {
      set_headers = {
        ["X-Forwarded-For"] = "10.0.0.1",
        ["HOST"] = "example.test",
        ["cookie"] = false,
        ["X-List"] = { "a", "b" },
        ["X-Number"] = 7,
      },
    })
    local _, fields = parse_head(seen.head)
    assert.same({ "10.0.0.1" }, values(fields, "x-forwarded-for"))
    assert.same({ "example.test" }, values(fields, "host"))
    assert.same({}, values(fields, "cookie"))
    assert.same({ "a", "b" }, values(fields, "x-list"))
    assert.same({ "7" }, values(fields, "x-number"))
  end))

  it("drops drop_headers in any case", async(function()
    local seen = exchange("GET / HTTP/1.1\r\nHost: app\r\n"
      .. "X-Secret: 1\r\nx-secret: 2\r\nX-Other: 3\r\n\r\n", {
      drop_headers = { ["x-secret"] = true },
    })
    local _, fields = parse_head(seen.head)
    assert.same({}, values(fields, "x-secret"))
    assert.same({ "3" }, values(fields, "x-other"))
  end))

  it("adds Host from the upstream address", async(function()
    local seen = {}
    local up = upstream(seen)
    local srv = front(up:port(), { set_headers = { Host = false } })
    local sock = raw.connect(srv:port())
    assert(sock:write("GET / HTTP/1.1\r\nHost: app\r\n\r\n"))
    assert(raw.read_response(sock))
    sock:close()
    local _, fields = parse_head(seen.head)
    assert.same({ "127.0.0.1:" .. up:port() }, values(fields, "host"))
    srv:close()
    up:close()
    proxy.close_pool()
  end))

  it("sends opts.target", async(function()
    local seen = exchange("GET /_port/3000/x?q=1 HTTP/1.1\r\nHost: app\r\n\r\n",
      { target = "/x?q=1" })
    local first = parse_head(seen.head)
    assert.equal("GET /x?q=1 HTTP/1.1", first)
  end))

  it("forwards a Content-Length body", async(function()
    local seen, res = exchange("POST / HTTP/1.1\r\nHost: app\r\n"
      .. "content-length: 5\r\n\r\nhello")
    local _, fields = parse_head(seen.head)
    assert.equal(200, res.status)
    assert.same({ "5" }, values(fields, "content-length"))
    assert.same({}, values(fields, "transfer-encoding"))
    assert.equal("hello", seen.body)
  end))

  it("forwards a chunked body chunked", async(function()
    local seen = exchange("PUT / HTTP/1.1\r\nHost: app\r\n"
      .. "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    local _, fields = parse_head(seen.head)
    assert.same({ "chunked" }, values(fields, "transfer-encoding"))
    assert.same({}, values(fields, "content-length"))
    assert.equal("abcde", seen.body)
  end))

  it("sends Content-Length 0 for an empty POST", async(function()
    local seen = exchange("POST / HTTP/1.1\r\nHost: app\r\n\r\n")
    local _, fields = parse_head(seen.head)
    assert.same({ "0" }, values(fields, "content-length"))
  end))

  it("keeps the request's Content-Length over set_headers", async(function()
    local seen = exchange("POST / HTTP/1.1\r\nHost: app\r\n"
      .. "Content-Length: 3\r\n\r\nabc",
      { set_headers = { ["Content-Length"] = "99" } })
    local _, fields = parse_head(seen.head)
    assert.same({ "3" }, values(fields, "content-length"))
    assert.equal("abc", seen.body)
  end))

  it("rejects a set_headers value with CR LF", async(function()
    local _, res = exchange("GET / HTTP/1.1\r\nHost: app\r\n\r\n",
      { set_headers = { ["X-Bad"] = "a\r\nX-Injected: 1" } })
    assert.equal(500, res.status)
  end))
end)


describe("proxy forward response head", function()
  it("drops hop-by-hop and Connection-named fields", async(function()
    local _, head = exchange_head("GET / HTTP/1.1\r\nHost: app\r\n\r\n", nil,
      "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\n"
        .. "Keep-Alive: timeout=5\r\nX-Hop: 1\r\nProxy-Authenticate: Basic\r\n"
        .. "Trailer: X-T\r\nX-End: 2\r\nContent-Length: 2\r\n\r\nok")
    local first, fields = parse_head(head)
    assert.equal("HTTP/1.1 200 OK", first)
    assert.same({}, values(fields, "x-hop"))
    assert.same({}, values(fields, "keep-alive"))
    assert.same({}, values(fields, "proxy-authenticate"))
    assert.same({}, values(fields, "trailer"))
    assert.same({}, values(fields, "connection"))
    assert.same({ "2" }, values(fields, "x-end"))
    assert.same({ "2" }, values(fields, "content-length"))
    assert.equal(1, #values(fields, "date"))
  end))

  it("keeps repeated Set-Cookie fields in order", async(function()
    local _, head = exchange_head("GET / HTTP/1.1\r\nHost: app\r\n\r\n", nil,
      "HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
        .. "Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nContent-Length: 0\r\n\r\n")
    local first, fields = parse_head(head)
    assert.equal("HTTP/1.1 201 Created", first)
    assert.same({ "a=1", "b=2" }, values(fields, "set-cookie"))
    assert.same({ "Thu, 01 Jan 2026 00:00:00 GMT" }, values(fields, "date"))
  end))

  it("chunks a chunked upstream body", async(function()
    local _, res = exchange("GET / HTTP/1.1\r\nHost: app\r\n\r\n", nil,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n")
    assert.equal(200, res.status)
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.is_nil(res.headers["content-length"])
    assert.equal("hello", res.body)
  end))

  it("chunks a close-delimited upstream body", async(function()
    local _, res = exchange("GET / HTTP/1.1\r\nHost: app\r\n\r\n", nil,
      "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close")
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.equal("until close", res.body)
  end))

  it("keeps a HEAD response's Content-Length", async(function()
    local seen = {}
    local up = upstream(seen, "HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n")
    local srv = front(up:port())
    local sock = raw.connect(srv:port())
    assert(sock:write("HEAD / HTTP/1.1\r\nHost: app\r\n\r\n"))
    local res = assert(raw.read_response(sock, { head = true }))
    assert.equal(200, res.status)
    assert.equal("42", res.headers["content-length"])
    assert.equal("HEAD / HTTP/1.1", (parse_head(seen.head)))
    sock:close()
    srv:close()
    up:close()
    proxy.close_pool()
  end))

  it("answers 502 when nothing listens", async(function()
    local up = upstream({})
    local port = up:port()
    up:close()
    local srv = front(port)
    local sock = raw.connect(srv:port())
    assert(sock:write("GET / HTTP/1.1\r\nHost: app\r\n\r\n"))
    local res = assert(raw.read_response(sock))
    assert.equal(502, res.status)
    assert.matches("upstream_unreachable", res.body)
    sock:close()
    srv:close()
  end))
end)


describe("proxy forward to a TLS upstream", function()
  local dir

  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir) == 0)
    assert(core.tls.generate({ ca = true, cn = "proxy spec ca",
      cert_out = dir .. "/ca.pem", key_out = dir .. "/ca.key" }))
    assert(core.tls.generate({ names = { "upstream.test" },
      cert_out = dir .. "/up.pem", key_out = dir .. "/up.key",
      issuer_cert = dir .. "/ca.pem", issuer_key = dir .. "/ca.key" }))
  end)

  teardown(function()
    os.execute("rm -rf " .. dir)
  end)

  it("relays through TLS and reuses the connection", async(function()
    local peers = {}
    local secure = assert(core.http.listen({ port = 0, access_log = false,
      tls = assert(core.tls.server_context({ cert = dir .. "/up.pem",
        key = dir .. "/up.key" })),
      handler = function(req)
        local ip, port = req:peer()
        peers[#peers + 1] = ip .. ":" .. port
        return 200, { ["X-Seen"] = req.target }, "secure"
      end }))
    local client_ctx = assert(core.tls.client_context({
      ca = dir .. "/ca.pem" }))

    local front_server = assert(core.http.listen({ port = 0, access_log = false,
      handler = function(req)
        return proxy.forward(req, { host = "127.0.0.1",
          port = secure:port(), tls = client_ctx,
          server_name = "upstream.test", timeout = 10 })
      end }))

    for i = 1, 2 do
      local res = assert(core.http.request({ host = "127.0.0.1",
        port = front_server:port(), path = "/x" .. i, timeout = 10 }))
      assert.equal(200, res.status)
      assert.equal("/x" .. i, res:header("x-seen"))
      assert.equal("secure", res:read_body())
      res:close()
    end
    assert.equal(2, #peers)
    assert.equal(peers[1], peers[2])

    -- A certificate for another name is refused: a 502, not a relay.
    local wrong = assert(core.http.listen({ port = 0, access_log = false,
      handler = function(req)
        return proxy.forward(req, { host = "127.0.0.1",
          port = secure:port(), tls = client_ctx,
          server_name = "other.test", timeout = 10 })
      end }))
    local res = assert(core.http.request({ host = "127.0.0.1",
      port = wrong:port(), path = "/", timeout = 10 }))
    assert.equal(502, res.status)
    res:close()

    wrong:close()
    front_server:close()
    secure:close()
  end))
end)
