-- A real `justavps edge` in plain HTTP development mode in front of two
-- brokers (one of them down), a real broker, a real daemon and a backend
-- app, all on loopback, with a fresh platform database. Requests name
-- machines through explicit Host headers, so no DNS is involved.
local core = require("justavps.core")
local json = require("justavps.json")
local websocket = require("justavps.websocket")
local helpers = require("support.helpers")
local apikey = require("justavps.auth.apikey")
local proxy_token = require("justavps.auth.proxy_token")
local ticket = require("justavps.auth.ticket")
local bp = require("04-broker.broker_process")
local ep = require("04-edge.edge_process")

local async = helpers.async
local crypto = core.crypto

local DOMAIN = "example.test"
local SLUG = "edge-one"
local HOST = SLUG .. "." .. DOMAIN
local JWT_SECRET = "edge-jwt-secret-0123456789abcdef0123456789"
local DEAD_SECRET = "dead-broker-secret-0123456789abcdef012345"
local MACHINE_TOKEN = "machine-token-0123456789abcdef0123456789"
local LOGIN_URL = "http://dashboard.example.test/login"


local function hex_sha256(text)
  return crypto.hex_encode(crypto.sha256(text))
end


describe("edge", function()
  local settings = ep.pg_settings()
  local dbname, env, db
  local app, app_port, seen
  local daemon, broker, edge, edge_port, dead_port
  local ids = {}
  local keys = {}
  local secrets = {}

  -- The backend app: records what it received and echoes WebSockets.
  local function start_app()
    seen = {}
    return assert(core.http.listen{
      host = "127.0.0.1", port = 0, access_log = false,
      handler = function(req)
        local report = { target = req.target, headers = req:headers() }
        seen[#seen + 1] = report
        if req.path == "/ws" then
          local ok, key = websocket.check_request(req.method, function(name)
            return req:header(name)
          end)
          assert(ok)
          local sock = req:hijack()
          websocket.server_handshake(sock, key)
          local conn = websocket.wrap(sock, { role = "server" })
          while true do
            local data, kind = conn:recv()
            if not data or kind == "close" then
              break
            end
            conn:send(data, kind)
          end
          return
        end
        return 200, { ["Content-Type"] = "application/json" },
          json.encode(report)
      end,
    })
  end

  local function insert_rows()
    local acct = assert(db:query("INSERT INTO accounts (name) VALUES ($1) "
      .. "RETURNING id", { "edge spec" }))[1].id
    local other = assert(db:query("INSERT INTO accounts (name) VALUES ($1) "
      .. "RETURNING id", { "other" }))[1].id
    ids.user = assert(db:query("INSERT INTO users (account_id, email) "
      .. "VALUES ($1, $2) RETURNING id", { acct, "edge@example.test" }))[1].id

    local function machine(slug, account, stage, ip)
      return assert(db:query("INSERT INTO machines (slug, account_id, name, "
        .. "provider, region, server_type, stage, ip, token) VALUES ($1, $2, "
        .. "$3, 'local', 'local', 'local', $4, $5, $6) RETURNING id",
        { slug, account, slug, stage, ip, MACHINE_TOKEN }))[1].id
    end
    ids.machine = machine(SLUG, acct, "services_ready", "127.0.0.1")
    ids.provisioning = machine("edge-prov", acct, "cloud_init_running", nil)
    ids.gone = machine("edge-gone", acct, "deleted", "127.0.0.1")

    local function key(name, account, scopes)
      local k = assert(apikey.generate())
      assert(db:query("INSERT INTO api_keys (account_id, name, prefix, hash, "
        .. "scopes) VALUES ($1, $2, $3, $4, $5::text[])", { account, name,
        k.prefix, k.hash, "{" .. table.concat(scopes, ",") .. "}" }))
      secrets[#secrets + 1] = k.key
      return k.key
    end
    keys.proxy = key("proxy", acct, { "proxy" })
    keys.read = key("read", acct, { "read" })
    keys.exec = key("exec", acct, { "exec" })
    keys.other = key("other account", other, { "proxy", "exec", "read" })
  end

  -- Issues a share token for port and stores it as the platform does.
  local function share_token(port)
    local token = assert(proxy_token.issue_share({ slug = SLUG, port = port },
      JWT_SECRET))
    assert(db:query("INSERT INTO proxy_tokens (machine_id, port, token_hash, "
      .. "expires_at) VALUES ($1, $2, $3, now() + interval '1 hour')",
      { ids.machine, port, hex_sha256(token) }))
    secrets[#secrets + 1] = token
    return token
  end

  local function owner_token()
    local token = assert(proxy_token.issue_owner({ user_id = ids.user,
      slug = SLUG }, JWT_SECRET))
    secrets[#secrets + 1] = token
    return token
  end

  local function new_ticket()
    local issued = ticket.issue({ slug = SLUG, user_id = ids.user })
    assert(db:query("INSERT INTO machine_tickets (machine_id, user_id, "
      .. "ticket_hash) VALUES ($1, $2, $3)",
      { ids.machine, ids.user, issued.hash }))
    secrets[#secrets + 1] = issued.ticket
    return issued.ticket
  end

  -- The edge's config: the dead broker comes first, so the first request
  -- of a new edge meets it.
  local function edge_config()
    return {
      domain = DOMAIN,
      insecure_plain_http = true,
      listen = { host = "127.0.0.1", port = 0 },
      brokers = {
        { url = "http://127.0.0.1:" .. dead_port, id = "dead-broker",
          secret = DEAD_SECRET },
        { url = "http://127.0.0.1:" .. broker.port, id = bp.BROKER_ID,
          secret = bp.SECRET },
      },
      broker_health = { interval = 60, down_for = 60 },
      machine_port = daemon.ports.public,
      login_url = LOGIN_URL,
      cache = { machine_ttl = 600, credential_ttl = 1 },
    }
  end

  setup(function()
    helpers.run(function()
      dbname, env = ep.create_database(settings)
      db = ep.connect(settings, dbname)
      insert_rows()
      app = start_app()
      app_port = app:port()

      local root = ep.temp_dir()
      daemon = ep.start("daemon", {
        slug = SLUG, token = MACHINE_TOKEN,
        platform_url = "http://127.0.0.1:" .. ep.closed_port(),
        heartbeat_interval = 3600,
        public = { host = "127.0.0.1", port = 0 },
        internal = { host = "127.0.0.1", port = 0 },
        broker_cidrs = { "127.0.0.0/8" },
        routing = { default_port = app_port },
        toolbox_root = root, state_dir = root,
      }, nil, { "public", "internal" })

      broker = bp.start({
        broker_id = bp.BROKER_ID, secret = bp.SECRET,
        insecure_plain_http = true, forwarded_proto = "http",
        listen = { host = "127.0.0.1", port = 0 },
        nonce = { max_bytes = "1M" },
        target = { allow_networks = { "127.0.0.0/8" } },
      }, { "--access-log=false" })
      assert(broker.port, "broker did not start")

      dead_port = ep.closed_port()
      env.JUSTAVPS_EDGE_JWT_SECRET = JWT_SECRET
      edge = ep.start("edge", edge_config(), env, { "main" })
      edge_port = edge.ports.main
    end, 120)
  end)

  teardown(function()
    helpers.run(function()
      local statuses = {}
      if edge then
        statuses.edge = ep.stop(edge)
      end
      if broker then
        bp.stop(broker)
      end
      if daemon then
        ep.stop(daemon)
      end
      if app then
        app:close()
      end
      if db then
        db:close()
      end
      ep.drop_database(settings, dbname)
      assert.equal(0, statuses.edge)

      -- No key, token, ticket or secret may reach the edge's log.
      local text = table.concat(edge.lines, "\n")
      for _, s in ipairs(secrets) do
        assert.is_nil(text:find(s, 1, true), "a credential was logged")
      end
      assert.is_nil(text:find(JWT_SECRET, 1, true))
      assert.is_nil(text:find(bp.SECRET, 1, true))
    end, 60)
  end)

  -- Sends a request to the edge. Returns the response, its body and the
  -- decoded JSON body (or nil).
  local function request(method, target, headers, body)
    headers = headers or {}
    if headers.Host == nil then
      headers.Host = HOST
    end
    local res = assert(core.http.request{ method = method,
      host = "127.0.0.1", port = edge_port, path = target,
      headers = headers, body = body, timeout = 15 })
    local text = res:read_body()
    res:close()
    local decoded = text ~= "" and json.decode(text) or nil
    return res, text, decoded
  end

  local function get(target, headers)
    return request("GET", target, headers)
  end

  local function cookie(token)
    return "__justavps_proxy=" .. token
  end

  local function bearer(key)
    return "Bearer " .. key
  end

  -- Opens a WebSocket through the edge. Returns the connection, or nil,
  -- code, status.
  local function ws(target, headers, host)
    local sock = assert(core.tcp.connect("127.0.0.1", edge_port))
    sock:settimeout(15)
    local ok, _, code, status = websocket.client_handshake(sock,
      { host = host or HOST, path = target, headers = headers })
    if not ok then
      sock:close()
      return nil, code, status
    end
    return websocket.wrap(sock, { role = "client" })
  end

  describe("hosts", function()
    it("returns 404 for a host of another domain", async(function()
      local res, _, body = get("/", { Host = "edge-one.other.test" })
      assert.equal(404, res.status)
      assert.equal("unknown_host", body.error.code)
    end))

    it("returns 404 for an unknown machine", async(function()
      local res, _, body = get("/", { Host = "nobody-here." .. DOMAIN })
      assert.equal(404, res.status)
      assert.equal("unknown_machine", body.error.code)
    end))

    it("returns 404 for a deleted machine", async(function()
      local res, _, body = get("/", { Host = "edge-gone." .. DOMAIN })
      assert.equal(404, res.status)
      assert.equal("unknown_machine", body.error.code)
    end))

    it("returns 503 while provisioning", async(function()
      local res, _, body = get("/", { Host = "edge-prov." .. DOMAIN,
        Authorization = bearer(keys.proxy) })
      assert.equal(503, res.status)
      assert.equal("machine_provisioning", body.error.code)
      assert.equal("cloud_init_running", body.error.stage)
      assert.equal("10", res:header("retry-after"))
    end))

    it("answers a browser with an HTML page", async(function()
      local res, text = get("/", { Host = "edge-prov." .. DOMAIN,
        Accept = "text/html,application/xhtml+xml" })
      assert.equal(503, res.status)
      assert.truthy(res:header("content-type"):find("text/html", 1, true))
      assert.truthy(text:find("machine_provisioning", 1, true))
    end))

    it("matches the host without regard to case", async(function()
      local res = get("/", { Host = "Edge-One.EXAMPLE.test",
        Authorization = bearer(keys.proxy) })
      assert.equal(200, res.status)
    end))
  end)

  describe("without credentials", function()
    it("returns 401 JSON to an API client", async(function()
      local res, _, body = get("/", { Accept = "application/json" })
      assert.equal(401, res.status)
      assert.equal("unauthorized", body.error.code)
    end))

    it("redirects a browser to the login", async(function()
      local res = get("/page?x=1", { Accept = "text/html" })
      assert.equal(302, res.status)
      local location = res:header("location")
      assert.equal(1, location:find(LOGIN_URL .. "?return_to=", 1, true))
      assert.truthy(location:find("edge-one.example.test", 1, true))
    end))

    it("returns 401 to a WebSocket, never a redirect", async(function()
      local conn, code, status = ws("/ws", { Accept = "text/html",
        Origin = "http://" .. HOST })
      assert.is_nil(conn)
      assert.equal("bad_status", code)
      assert.equal(401, status)
    end))
  end)

  describe("the proxy cookie", function()
    it("opens app paths without leaking credentials", async(function()
      local res, _, body = get("/page?a=1", {
        Cookie = "theme=dark; " .. cookie(owner_token())
          .. "; __justavps_other=x; lang=en",
        ["X-JustAVPS-Slug"] = "forged",
        ["X-JustAVPS-Target-IP"] = "10.0.0.1",
        ["X-JustAVPS-Anything"] = "forged",
      })
      assert.equal(200, res.status)
      assert.equal("/page?a=1", body.target)
      assert.equal("theme=dark; lang=en", body.headers["cookie"])
      for name in pairs(body.headers) do
        assert.is_nil(name:find("^x%-justavps%-"), name .. " reached the app")
      end
    end))

    it("never opens /_pty", async(function()
      local res, _, body = get("/_pty", { Cookie = cookie(owner_token()) })
      assert.equal(403, res.status)
      assert.equal("ticket_required", body.error.code)
    end))

    it("never opens /_toolbox", async(function()
      local res, _, body = get("/_toolbox/list/",
        { Cookie = cookie(owner_token()) })
      assert.equal(403, res.status)
      assert.equal("ticket_required", body.error.code)
    end))

    it("rejects a token for another machine", async(function()
      local other = assert(proxy_token.issue_owner({ user_id = ids.user,
        slug = "edge-two" }, JWT_SECRET))
      local res, _, body = get("/", { Cookie = cookie(other) })
      assert.equal(401, res.status)
      assert.equal("invalid_token", body.error.code)
    end))

    it("rejects an alg other than HS256", async(function()
      local token = owner_token()
      local header = crypto.base64url_encode('{"alg":"HS512","typ":"JWT"}')
      local forged = header .. token:sub(token:find(".", 1, true))
      local res, _, body = get("/", { Cookie = cookie(forged) })
      assert.equal(401, res.status)
      assert.equal("invalid_token", body.error.code)
    end))

    it("rejects an expired token", async(function()
      local old = assert(proxy_token.issue_owner({ user_id = ids.user,
        slug = SLUG, now = os.time() - 3600, ttl = 60 }, JWT_SECRET))
      local res = get("/", { Cookie = cookie(old) })
      assert.equal(401, res.status)
    end))
  end)

  describe("a share token", function()
    it("is exchanged for a cookie by a redirect", async(function()
      local token = share_token(app_port)
      local path = "/_port/" .. app_port .. "/x"
      local res = get(path .. "?keep=1&__justavps_token=" .. token .. "&b=2")
      assert.equal(302, res.status)
      assert.equal(path .. "?keep=1&b=2", res:header("location"))
      local set = res:header("set-cookie")
      assert.equal(1, set:find("__justavps_proxy=" .. token .. ";", 1, true))
      assert.truthy(set:find("HttpOnly", 1, true))
      assert.truthy(set:find("SameSite=Lax", 1, true))
      assert.truthy(set:find("Path=/", 1, true))
      assert.is_nil(set:lower():find("domain="))

      local after, _, body = get(path .. "?keep=1&b=2",
        { Cookie = cookie(token) })
      assert.equal(200, after.status)
      assert.equal("/x?keep=1&b=2", body.target)
      assert.is_nil(body.headers["cookie"])
    end))

    it("opens its port host", async(function()
      local token = share_token(app_port)
      local host = app_port .. "-" .. HOST
      local res = get("/hello?__justavps_token=" .. token, { Host = host })
      assert.equal(302, res.status)
      assert.equal("/hello", res:header("location"))

      local after, _, body = get("/hello", { Host = host,
        Cookie = cookie(token) })
      assert.equal(200, after.status)
      assert.equal("/hello", body.target)
      -- The app's public URL on a port host has no prefix.
      assert.is_nil(body.headers["x-forwarded-prefix"])
    end))

    it("cannot open another port", async(function()
      local token = share_token(app_port)
      local other = app_port == 65535 and 65534 or app_port + 1
      local res, _, body = get("/", { Host = other .. "-" .. HOST,
        Cookie = cookie(token) })
      assert.equal(403, res.status)
      assert.equal("wrong_port", body.error.code)

      res, _, body = get("/_port/" .. other .. "/", { Cookie = cookie(token) })
      assert.equal(403, res.status)
      assert.equal("wrong_port", body.error.code)

      res, _, body = get("/", { Cookie = cookie(token) })
      assert.equal(403, res.status)
      assert.equal("outside_port", body.error.code)
    end))

    it("cannot open /_pty or /_toolbox", async(function()
      local token = share_token(app_port)
      for _, path in ipairs({ "/_pty", "/_toolbox/list/", "/%5Fpty" }) do
        local res, _, body = get(path, { Cookie = cookie(token) })
        assert.equal(403, res.status, path)
        assert.equal("ticket_required", body.error.code, path)
      end
    end))

    it("stops working once revoked", async(function()
      local token = share_token(app_port)
      local path = "/_port/" .. app_port .. "/r"
      local res = get(path, { Cookie = cookie(token) })
      assert.equal(200, res.status)
      assert(db:query("UPDATE proxy_tokens SET revoked_at = now() "
        .. "WHERE token_hash = $1", { hex_sha256(token) }))
      -- The edge caches the revocation state for credential_ttl (1 s).
      core.sleep(1.5)
      local after, _, body = get(path, { Cookie = cookie(token) })
      assert.equal(401, after.status)
      assert.equal("invalid_token", body.error.code)
    end))

    it("is not accepted when never stored", async(function()
      local token = assert(proxy_token.issue_share({ slug = SLUG,
        port = app_port }, JWT_SECRET))
      local res = get("/_port/" .. app_port .. "/", { Cookie = cookie(token) })
      assert.equal(401, res.status)
    end))
  end)

  describe("an API key", function()
    it("with proxy opens app paths", async(function()
      local res, _, body = get("/k", { Authorization = bearer(keys.proxy) })
      assert.equal(200, res.status)
      assert.equal("/k", body.target)
      assert.is_nil(body.headers["authorization"])
    end))

    it("leaves the app's own Authorization alone", async(function()
      local res, _, body = get("/k", { Cookie = cookie(owner_token()),
        Authorization = "Basic dXNlcjpwYXNz" })
      assert.equal(200, res.status)
      assert.equal("Basic dXNlcjpwYXNz", body.headers["authorization"])
    end))

    it("without proxy is rejected", async(function()
      local res, _, body = get("/k", { Authorization = bearer(keys.read) })
      assert.equal(403, res.status)
      assert.equal("insufficient_scope", body.error.code)
    end))

    it("of another account is rejected", async(function()
      local res, _, body = get("/k", { Authorization = bearer(keys.other) })
      assert.equal(401, res.status)
      assert.equal("invalid_api_key", body.error.code)
    end))

    it("with read lists files", async(function()
      local res = get("/_toolbox/list/", { Authorization = bearer(keys.read) })
      assert.equal(200, res.status)
    end))

    it("with exec only cannot list files", async(function()
      local res, _, body = get("/_toolbox/list/",
        { Authorization = bearer(keys.exec) })
      assert.equal(403, res.status)
      assert.equal("insufficient_scope", body.error.code)
    end))

    it("is checked for each method and host kind", async(function()
      for _ = 1, 2 do
        local res = get("/_toolbox/list/",
          { Authorization = bearer(keys.read) })
        assert.equal(200, res.status)
        local posted, _, body = request("POST", "/_toolbox/list/",
          { Authorization = bearer(keys.read) }, "")
        assert.equal(403, posted.status)
        assert.equal("insufficient_scope", body.error.code)

        local app_res, _, app_seen = get("/_pty", { Authorization =
          bearer(keys.proxy), Host = app_port .. "-" .. HOST })
        assert.equal(200, app_res.status)
        assert.equal("/_pty", app_seen.target)
        local pty = get("/_pty", { Authorization = bearer(keys.proxy) })
        assert.equal(403, pty.status)
      end
    end))

    it("with proxy only cannot open /_pty", async(function()
      local res, _, body = get("/_pty", { Authorization = bearer(keys.proxy) })
      assert.equal(403, res.status)
      assert.equal("insufficient_scope", body.error.code)
    end))

    -- Sends GET target with the Authorization value (nil for none) and
    -- the header lines extra (nil for none) on the kept-alive sock.
    -- Returns the status and the decoded JSON body.
    local function keepalive_get(sock, target, authorization, extra)
      local head = "GET " .. target .. " HTTP/1.1\r\nHost: " .. HOST .. "\r\n"
      if authorization then
        head = head .. "Authorization: " .. authorization .. "\r\n"
      end
      head = head .. (extra or "")
      assert(sock:write(head .. "\r\n"))
      local response = assert(sock:readuntil("\r\n\r\n"))
      local status = tonumber(response:match("^HTTP/1%.1 (%d+) "))
      local length = tonumber(
        response:match("\r\n[Cc]ontent%-[Ll]ength: *(%d+)"))
      assert.is_not_nil(length, "response without Content-Length")
      local body = length > 0 and assert(sock:readn(length)) or ""
      return status, body ~= "" and json.decode(body) or nil
    end

    it("is checked again when it changes on a connection", async(function()
      local sock = assert(core.tcp.connect("127.0.0.1", edge_port))
      sock:settimeout(15)
      local status, body = keepalive_get(sock, "/k", bearer(keys.proxy))
      assert.equal(200, status)
      assert.is_nil(body.headers["authorization"])

      status, body = keepalive_get(sock, "/k", bearer(keys.other))
      assert.equal(401, status)
      assert.equal("invalid_api_key", body.error.code)

      status, body = keepalive_get(sock, "/k", bearer(keys.read))
      assert.equal(403, status)
      assert.equal("insufficient_scope", body.error.code)

      status, body = keepalive_get(sock, "/k",
        "Bearer sk_live_" .. string.rep("A", 42))
      assert.equal(401, status)
      assert.equal("invalid_api_key", body.error.code)

      status, body = keepalive_get(sock, "/k")
      assert.equal(401, status)
      assert.equal("unauthorized", body.error.code)

      status = keepalive_get(sock, "/k", bearer(keys.proxy))
      assert.equal(200, status)
      sock:close()
    end))

    it("rejects two Authorization headers in either order", async(function()
      -- The platform rejects them too: which one counts would depend on
      -- the reader.
      local sock = assert(core.tcp.connect("127.0.0.1", edge_port))
      sock:settimeout(15)
      local status, body = keepalive_get(sock, "/k", bearer(keys.proxy),
        "Authorization: Basic dXNlcjpwYXNz\r\n")
      assert.equal(401, status)
      assert.equal("unauthorized", body.error.code)
      assert.truthy(body.error.message:find("more than one", 1, true))

      status, body = keepalive_get(sock, "/k", "Basic dXNlcjpwYXNz",
        "Authorization: " .. bearer(keys.proxy) .. "\r\n")
      assert.equal(401, status)
      assert.equal("unauthorized", body.error.code)

      -- One header alone still works on the same connection.
      status = keepalive_get(sock, "/k", bearer(keys.proxy))
      assert.equal(200, status)
      sock:close()
    end))

    it("is not needed with the cookie in a second Cookie header",
      async(function()
        local sock = assert(core.tcp.connect("127.0.0.1", edge_port))
        sock:settimeout(15)
        local status, body = keepalive_get(sock, "/k", nil,
          "Cookie: a=1\r\nCookie: " .. cookie(owner_token()) .. "\r\n")
        assert.equal(200, status)
        assert.equal("a=1", body.headers["cookie"])

        status, body = keepalive_get(sock, "/k", nil, "Cookie: a=1\r\n")
        assert.equal(401, status)
        assert.equal("unauthorized", body.error.code)
        sock:close()
      end))

    it("stops working once revoked", async(function()
      local k = assert(apikey.generate())
      assert(db:query("INSERT INTO api_keys (account_id, name, prefix, "
        .. "hash, scopes) SELECT account_id, 'revoked later', $1, $2, "
        .. "'{proxy}'::text[] FROM machines WHERE id = $3",
        { k.prefix, k.hash, ids.machine }))
      secrets[#secrets + 1] = k.key
      local sock = assert(core.tcp.connect("127.0.0.1", edge_port))
      sock:settimeout(15)
      assert.equal(200, keepalive_get(sock, "/k", bearer(k.key)))
      assert.equal(200, get("/k", { Authorization = bearer(k.key) }).status)

      assert(db:query("UPDATE api_keys SET revoked_at = now() "
        .. "WHERE hash = $1", { k.hash }))
      -- The edge caches the key's lookup for credential_ttl (1 s).
      core.sleep(1.5)
      local status, body = keepalive_get(sock, "/k", bearer(k.key))
      assert.equal(401, status)
      assert.equal("invalid_api_key", body.error.code)
      local res, _, fresh = get("/k", { Authorization = bearer(k.key) })
      assert.equal(401, res.status)
      assert.equal("invalid_api_key", fresh.error.code)
      sock:close()
    end))
  end)

  describe("a machine ticket", function()
    it("opens /_toolbox once", async(function()
      local t = new_ticket()
      local res = get("/_toolbox/list/?__justavps_ticket=" .. t)
      assert.equal(200, res.status)

      local again, _, body = get("/_toolbox/list/?__justavps_ticket=" .. t)
      assert.equal(401, again.status)
      assert.equal("invalid_ticket", body.error.code)
    end))

    it("never reaches the machine", async(function()
      local t = new_ticket()
      local res = get("/_toolbox/list/?__justavps_ticket=" .. t)
      assert.equal(200, res.status)
      -- The toolbox is the daemon's own, so look at what the app saw for
      -- a ticket on an app path: it is stripped there too.
      local before = #seen
      local t2 = new_ticket()
      get("/t?__justavps_ticket=" .. t2 .. "&q=1",
        { Authorization = bearer(keys.proxy) })
      assert.equal(before + 1, #seen)
      assert.equal("/t?q=1", seen[#seen].target)
    end))
  end)

  describe("a WebSocket", function()
    it("from the same origin is piped", async(function()
      local conn = assert(ws("/ws", { Cookie = cookie(owner_token()),
        Origin = "http://" .. HOST }))
      assert(conn:send("hello through the edge", "text"))
      local data = conn:recv()
      assert.equal("hello through the edge", data)
      conn:close(1000, "done")
    end))

    it("from a foreign origin is rejected", async(function()
      local conn, code, status = ws("/ws", { Cookie = cookie(owner_token()),
        Origin = "http://evil.example.org" })
      assert.is_nil(conn)
      assert.equal("bad_status", code)
      assert.equal(403, status)
    end))

    it("from a foreign origin spends no ticket", async(function()
      local t = new_ticket()
      local conn, _, status = ws("/_pty?__justavps_ticket=" .. t,
        { Origin = "http://evil.example.org" })
      assert.is_nil(conn)
      assert.equal(403, status)
      local row = assert(db:query("SELECT used_at IS NULL AS unused FROM "
        .. "machine_tickets WHERE ticket_hash = $1", { ticket.hash(t) }))[1]
      assert.is_true(row.unused)
    end))
  end)

  describe("machine events", function()
    it("drop a cached machine at once", async(function()
      local host = "edge-prov." .. DOMAIN
      local headers = { Host = host, Authorization = bearer(keys.proxy) }
      local res = get("/", headers)
      assert.equal(503, res.status)

      assert(db:query("UPDATE machines SET stage = 'services_ready', "
        .. "ip = '127.0.0.1' WHERE id = $1", { ids.provisioning }))
      assert(db:query("INSERT INTO machine_events (machine_id, stage) "
        .. "VALUES ($1, 'services_ready')", { ids.provisioning }))

      -- The cache keeps machines for 600 s, so only the notification can
      -- make the edge see the new stage while this loop polls.
      local status
      for _ = 1, 100 do
        status = get("/", headers).status
        if status ~= 503 then
          break
        end
        core.sleep(0.1)
      end
      assert.equal(200, status)
    end))
  end)

  describe("broker failover", function()
    it("serves every request with one broker down", async(function()
      for i = 1, 6 do
        local res = get("/f" .. i, { Authorization = bearer(keys.proxy) })
        assert.equal(200, res.status, "request " .. i)
      end
      local marked = false
      for _, line in ipairs(edge.lines) do
        if line:find("broker marked down", 1, true)
            and line:find("dead-broker", 1, true)
            and line:find("connection refused", 1, true) then
          marked = true
        end
      end
      assert.is_true(marked)
    end))

    it("keeps a ticket request on one run", async(function()
      -- A fresh edge meets the dead broker first. A ticket request that
      -- failed there in the fast path would run its access checks again,
      -- and the second run could not spend the single-use ticket.
      local second = ep.start("edge", edge_config(), env, { "main" })
      local res = assert(core.http.request{ method = "GET",
        host = "127.0.0.1", port = second.ports.main,
        path = "/_toolbox/list/?__justavps_ticket=" .. new_ticket(),
        headers = { Host = HOST }, timeout = 15 })
      local text = res:read_body()
      res:close()
      assert.equal(0, ep.stop(second))
      assert.equal(200, res.status, text)
    end))
  end)
end)
