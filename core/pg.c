/*
 * pg.c: an asynchronous PostgreSQL client on the loop (core.pg).
 *
 * libpq runs in non-blocking mode and a uv_poll_t watches its socket, so
 * connecting, querying and waiting for notifications park the calling
 * coroutine instead of the loop. A connection runs one query at a time;
 * further queries wait in a FIFO queue. Every query goes out through
 * PQsendQueryParams with the parameters apart from the SQL text, so a
 * parameter is never parsed as SQL. The pool and conn:transaction are a
 * Lua chunk at the end of this file, because a C function cannot continue
 * after a yield under LuaJIT.
 */
#include "internal.h"

#include "dynlib_pq.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JV_PG_CONN_MT  "justavps.pg.conn"
#define JV_PG_BYTEA_MT "justavps.pg.bytea"

/* Seconds for connecting and for each query unless the caller sets one. */
#define PG_DEFAULT_TIMEOUT 30.0

/* After a timed-out query is cancelled, the connection waits this long for
 * the server to confirm before it gives the connection up as broken. */
#define PG_CANCEL_GRACE_MS 5000

/* Notifications kept for a connection that no coroutine reads: the oldest
 * are dropped beyond this so a forgotten LISTEN cannot grow memory without
 * bound. */
#define PG_MAX_NOTIFICATIONS 10000

#define PG_MAX_CONNECT_PARAMS 64

/* Type OIDs from the server's pg_type catalogue (fixed since 8.x). */
#define OID_BOOL   16
#define OID_BYTEA  17
#define OID_INT8   20
#define OID_INT2   21
#define OID_INT4   23
#define OID_OID    26
#define OID_FLOAT4 700
#define OID_FLOAT8 701

/* The code callers test for a server that is down or a lost connection. */
static const char unavailable[] = "database_unavailable";

typedef enum {
  PG_CONNECTING = 0,
  PG_READY,
  PG_BROKEN, /* the connection failed; c->error has the reason */
  PG_CLOSED, /* conn:close() was called */
} jv_pg_state_t;

typedef struct jv_pg_conn_s jv_pg_conn_t;

/* A query waiting in the queue or running. One allocation contains the
 * struct, the parameter arrays and the copied SQL and parameter bytes. */
typedef struct jv_pg_query_s {
  struct jv_pg_query_s *next;
  jv_pg_conn_t *conn;
  uv_timer_t timer; /* the query's timeout, counted from the call */
  int ref;          /* parked coroutine, or LUA_NOREF once resumed */
  double timeout;   /* seconds, for the timeout message */
  int nparams;
  const char *sql;
  const char **values;
  int *lengths;
  int *formats;
  Oid *types;
} jv_pg_query_t;

/* A poll handle in its own allocation: during connect libpq may replace
 * its socket, and the old handle must stay valid until its close
 * callback. The callback also finishes the PGconn when finish is set, so
 * the socket is closed only after libuv stopped watching it. */
typedef struct {
  uv_poll_t poll;
  PGconn *finish;
} jv_pg_poll_t;

typedef struct jv_pg_note_s {
  struct jv_pg_note_s *next;
  int pid;
  size_t channel_len;
  size_t payload_len;
  char data[]; /* channel, NUL, payload, NUL */
} jv_pg_note_t;

struct jv_pg_conn_s {
  PGconn *pg;
  jv_pg_poll_t *poll;
  int events; /* what the poll handle waits for */
  jv_pg_state_t state;
  double timeout; /* seconds per query; 0 = none */

  int self_ref;      /* anchors the userdata while connecting */
  int connect_ref;   /* parked connector */
  uv_timer_t *timer; /* connect timeout, then the cancel grace period */

  jv_pg_query_t *current; /* sent to the server, or NULL */
  jv_pg_query_t *head;    /* queued, not yet sent */
  jv_pg_query_t *tail;
  PGresult *result; /* the current query's result so far */

  jv_pg_note_t *notes; /* received notifications, oldest first */
  jv_pg_note_t *notes_tail;
  size_t notes_len;
  int notify_ref; /* coroutine in wait_notification */
  uv_timer_t *notify_timer;

  char error[256]; /* why the connection broke */
};

static void conn_poll_cb(uv_poll_t *handle, int status, int events);
static void conn_dispatch(jv_pg_conn_t *c);
static void conn_fail(jv_pg_conn_t *c, const char *message);


static void
handle_free_cb(uv_handle_t *handle)
{
  free(handle);
}


static void
poll_close_cb(uv_handle_t *handle)
{
  jv_pg_poll_t *p = (jv_pg_poll_t *) handle;

  if (p->finish != NULL) {
    PQfinish(p->finish);
  }

  free(p);
}


/* Stops watching the socket; with finish set, the PGconn ends too. */
static void
conn_poll_close(jv_pg_conn_t *c, int finish)
{
  if (c->poll == NULL) {
    if (finish && c->pg != NULL) {
      PQfinish(c->pg);
    }

    return;
  }

  c->poll->finish = finish ? c->pg : NULL;
  uv_close((uv_handle_t *) &c->poll->poll, poll_close_cb);
  c->poll = NULL;
  c->events = 0;
}


/* Watches libpq's current socket for events. A socket that libpq
 * replaced gets a new handle: libuv must never see a new socket through
 * a watcher registered for a closed one. */
static int
conn_poll_start(jv_pg_conn_t *c, int events, int new_handle)
{
  int fd = PQsocket(c->pg);
  int rc;

  if (fd < 0) {
    return UV_EBADF;
  }

  if (c->poll != NULL && new_handle) {
    conn_poll_close(c, 0);
  }

  if (c->poll == NULL) {
    c->poll = malloc(sizeof(*c->poll));
    if (c->poll == NULL) {
      return UV_ENOMEM;
    }

    rc = uv_poll_init_socket(jv__loop(), &c->poll->poll, fd);
    if (rc != 0) {
      free(c->poll);
      c->poll = NULL;
      return rc;
    }

    c->poll->poll.data = c;
    c->poll->finish = NULL;
    c->events = 0;
  }

  if (events == c->events) {
    return 0;
  }

  c->events = events;
  return uv_poll_start(&c->poll->poll, events, conn_poll_cb);
}


/* Keeps the loop alive only while a coroutine waits on the connection, so
 * an idle connection does not stop a program from ending. */
static void
conn_update_ref(jv_pg_conn_t *c)
{
  uv_handle_t *h;

  if (c->poll == NULL) {
    return;
  }

  h = (uv_handle_t *) &c->poll->poll;
  if (c->current != NULL || c->head != NULL || c->notify_ref != LUA_NOREF ||
      c->connect_ref != LUA_NOREF) {
    uv_ref(h);

  } else {
    uv_unref(h);
  }
}


static void
conn_timer_stop(jv_pg_conn_t *c)
{
  if (c->timer != NULL) {
    uv_close((uv_handle_t *) c->timer, handle_free_cb);
    c->timer = NULL;
  }
}


static int
conn_timer_start(jv_pg_conn_t *c, uv_timer_cb cb, uint64_t ms)
{
  conn_timer_stop(c);
  c->timer = malloc(sizeof(*c->timer));
  if (c->timer == NULL) {
    return UV_ENOMEM;
  }

  uv_timer_init(jv__loop(), c->timer);
  c->timer->data = c;
  uv_timer_start(c->timer, cb, ms, 0);
  return 0;
}


/* Copies a libpq message into buf as one line without the trailing
 * newline: libpq ends messages with "\n" and indents hints with "\t". */
static void
copy_message(char *buf, size_t size, const char *message)
{
  size_t i, n = 0;

  if (message == NULL) {
    message = "unknown error";
  }

  for (i = 0; message[i] != '\0' && n + 1 < size; i++) {
    char ch = message[i];

    if (ch == '\n' || ch == '\t') {
      if (n > 0 && buf[n - 1] != ' ') {
        buf[n++] = ' ';
      }
      continue;
    }

    buf[n++] = ch;
  }

  while (n > 0 && buf[n - 1] == ' ') {
    n--;
  }

  buf[n] = '\0';
}


static int
push_failure(lua_State *L, const char *message, const char *code)
{
  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushstring(L, code);
  return 3;
}


/* ---- queries ---- */

static void
query_close_cb(uv_handle_t *handle)
{
  free(handle->data);
}


static void
query_free(jv_pg_query_t *q)
{
  uv_close((uv_handle_t *) &q->timer, query_close_cb);
}


static void
query_unlink(jv_pg_conn_t *c, jv_pg_query_t *q)
{
  jv_pg_query_t *prev = NULL, *p;

  for (p = c->head; p != NULL; prev = p, p = p->next) {
    if (p != q) {
      continue;
    }

    if (prev != NULL) {
      prev->next = q->next;

    } else {
      c->head = q->next;
    }

    if (c->tail == q) {
      c->tail = prev;
    }
    break;
  }

  q->next = NULL;
}


/* Resumes the parked coroutine of q with nil, message, code on the next
 * loop iteration (the caller may be a running coroutine) and frees q. */
static void
query_fail_later(jv_pg_query_t *q, const char *message, const char *code)
{
  if (q->ref != LUA_NOREF) {
    push_failure(jv__co_thread(q->ref), message, code);
    jv__co_resume_later(q->ref, 3);
    q->ref = LUA_NOREF;
  }

  query_free(q);
}


static void
cancel_work_cb(uv_work_t *req)
{
  PGcancel *cancel = req->data;
  char errbuf[256];

  /* PQcancel opens a new connection and blocks, so it runs on libuv's
   * thread pool. A failure leaves the grace timer to give the connection
   * up. */
  PQcancel(cancel, errbuf, sizeof(errbuf));
}


static void
cancel_after_cb(uv_work_t *req, int status)
{
  PQfreeCancel(req->data);
  free(req);
}


/* Asks the server to cancel the running query without waiting for it. */
static void
conn_send_cancel(jv_pg_conn_t *c)
{
  PGcancel *cancel = PQgetCancel(c->pg);
  uv_work_t *req;

  if (cancel == NULL) {
    return;
  }

  req = malloc(sizeof(*req));
  if (req == NULL) {
    PQfreeCancel(cancel);
    return;
  }

  req->data = cancel;
  if (uv_queue_work(jv__loop(), req, cancel_work_cb, cancel_after_cb) != 0) {
    PQfreeCancel(cancel);
    free(req);
  }
}


static void
cancel_grace_cb(uv_timer_t *timer)
{
  jv_pg_conn_t *c = timer->data;

  conn_fail(c, "the server did not confirm a query cancel within 5 s");
}


static void
query_timeout_cb(uv_timer_t *timer)
{
  jv_pg_query_t *q = timer->data;
  jv_pg_conn_t *c = q->conn;
  char message[96];
  int ref = q->ref;

  uv_timer_stop(timer);
  snprintf(message, sizeof(message), "query timed out after %g s", q->timeout);

  if (q == c->current) {
    /* The server still runs it: cancel it and keep q as the current query
     * until its result arrives, so the next query waits until then. */
    q->ref = LUA_NOREF;
    conn_send_cancel(c);
    if (conn_timer_start(c, cancel_grace_cb, PG_CANCEL_GRACE_MS) != 0) {
      conn_fail(c, "out of memory arming the cancel timer");
    }

  } else {
    query_unlink(c, q);
    q->ref = LUA_NOREF;
    query_free(q);
    conn_update_ref(c);
  }

  if (ref != LUA_NOREF) {
    push_failure(jv__co_thread(ref), message, "timeout");
    jv__co_resume(ref, 3);
  }
}


/* Formats n in the shortest text that reads back as the same double. */
static size_t
format_number(char *buf, size_t size, double n)
{
  int precision;

  if (isnan(n)) {
    return (size_t) snprintf(buf, size, "NaN");
  }

  if (isinf(n)) {
    return (size_t) snprintf(buf, size, n > 0 ? "Infinity" : "-Infinity");
  }

  if (n == floor(n) && fabs(n) < 1e17) {
    return (size_t) snprintf(buf, size, "%.0f", n);
  }

  for (precision = 15; precision < 17; precision++) {
    snprintf(buf, size, "%.*g", precision, n);
    if (strtod(buf, NULL) == n) {
      break;
    }
  }

  return (size_t) snprintf(buf, size, "%.*g", precision, n);
}


static int
is_bytea(lua_State *L, int idx)
{
  int match;

  if (!lua_getmetatable(L, idx)) {
    return 0;
  }

  luaL_getmetatable(L, JV_PG_BYTEA_MT);
  match = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return match;
}


/* Counts the parameters: params.n when set, else the largest integer key,
 * so nil holes in the middle of the array still count as NULL. */
static int
count_params(lua_State *L, int idx)
{
  lua_Number max = 0;

  lua_getfield(L, idx, "n");
  if (lua_type(L, -1) == LUA_TNUMBER) {
    max = lua_tonumber(L, -1);
    lua_pop(L, 1);

  } else {
    lua_pop(L, 1);
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
      lua_pop(L, 1);
      if (lua_type(L, -1) == LUA_TNUMBER) {
        lua_Number k = lua_tonumber(L, -1);

        if (k == floor(k) && k > max) {
          max = k;
        }
      }
    }
  }

  if (max < 0 || max > 65535) {
    luaL_error(L, "bad params: at most 65535 parameters, got %f", max);
  }

  return (int) max;
}


/* Returns the bytes parameter i (1-based) sends, raising on a type that
 * has no SQL form. Sets *binary for pg.bytea values and *null for NULL.
 * Numbers are formatted into numbuf. */
static const char *
param_bytes(lua_State *L, int params, int i, char *numbuf, size_t numsize,
            size_t *len, int *binary, int *null)
{
  const char *s;

  *binary = 0;
  *null = 0;
  lua_rawgeti(L, params, i);

  switch (lua_type(L, -1)) {
  case LUA_TNIL:
    *null = 1;
    *len = 0;
    s = NULL;
    break;

  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, -1) != NULL) {
      luaL_error(L,
                 "bad params: parameter %d is a light userdata other "
                 "than pg.null",
                 i);
    }
    *null = 1;
    *len = 0;
    s = NULL;
    break;

  case LUA_TBOOLEAN:
    s = lua_toboolean(L, -1) ? "t" : "f";
    *len = 1;
    break;

  case LUA_TNUMBER:
    *len = format_number(numbuf, numsize, lua_tonumber(L, -1));
    s = numbuf;
    break;

  case LUA_TSTRING:
    s = lua_tolstring(L, -1, len);
    if (memchr(s, '\0', *len) != NULL) {
      luaL_error(L,
                 "bad params: parameter %d contains a NUL byte; pass "
                 "binary data as pg.bytea(value)",
                 i);
    }
    break;

  case LUA_TTABLE:
    if (!is_bytea(L, -1)) {
      luaL_error(L,
                 "bad params: parameter %d is a table; expected a "
                 "string, number, boolean, nil, pg.null or pg.bytea",
                 i);
    }
    lua_rawgeti(L, -1, 1);
    lua_replace(L, -2);
    if (lua_type(L, -1) != LUA_TSTRING) {
      luaL_error(L,
                 "bad params: parameter %d is a pg.bytea without a "
                 "string",
                 i);
    }
    s = lua_tolstring(L, -1, len);
    *binary = 1;
    break;

  default:
    luaL_error(L,
               "bad params: parameter %d is a %s; expected a string, "
               "number, boolean, nil, pg.null or pg.bytea",
               i, luaL_typename(L, -1));
    return NULL;
  }

  /* The params table anchors strings; numbers live in numbuf. */
  lua_pop(L, 1);
  return s;
}


/* Builds a query from the SQL and the parameter table at index params (0
 * for none). Raises on misuse before anything is allocated. */
static jv_pg_query_t *
query_new(lua_State *L, jv_pg_conn_t *c, const char *sql, size_t sql_len,
          int params)
{
  char numbuf[40];
  size_t total, len, offset;
  int n = 0, i, binary, null;
  jv_pg_query_t *q;
  const char *s;
  char *bytes;

  if (memchr(sql, '\0', sql_len) != NULL) {
    luaL_error(L, "bad sql: contains a NUL byte");
  }

  if (params != 0) {
    n = count_params(L, params);
  }

  /* First pass: check every parameter and add up the bytes to copy. */
  total = sql_len + 1;
  for (i = 1; i <= n; i++) {
    param_bytes(L, params, i, numbuf, sizeof(numbuf), &len, &binary, &null);
    total += len + 1;
  }

  offset = sizeof(*q);
  offset += (size_t) n * (sizeof(char *) + 2 * sizeof(int) + sizeof(Oid));
  q = malloc(offset + total);
  if (q == NULL) {
    luaL_error(L, "out of memory");
    return NULL;
  }

  memset(q, 0, sizeof(*q));
  q->conn = c;
  q->ref = LUA_NOREF;
  q->nparams = n;
  q->values = (const char **) (q + 1);
  q->lengths = (int *) (q->values + n);
  q->formats = q->lengths + n;
  q->types = (Oid *) (q->formats + n);
  bytes = (char *) q + offset;

  memcpy(bytes, sql, sql_len);
  bytes[sql_len] = '\0';
  q->sql = bytes;
  bytes += sql_len + 1;

  for (i = 0; i < n; i++) {
    s = param_bytes(L, params, i + 1, numbuf, sizeof(numbuf), &len, &binary,
                    &null);
    q->lengths[i] = (int) len;
    q->formats[i] = binary;
    q->types[i] = binary ? OID_BYTEA : 0;

    if (null) {
      q->values[i] = NULL;
      continue;
    }

    memcpy(bytes, s, len);
    bytes[len] = '\0';
    q->values[i] = bytes;
    bytes += len + 1;
  }

  uv_timer_init(jv__loop(), &q->timer);
  q->timer.data = q;
  return q;
}


/* Pushes the value of one field, converted by its column type. */
static void
push_value(lua_State *L, const PGresult *res, int row, int col, Oid type)
{
  const char *v;
  long long ll;
  size_t len;
  char *end;

  if (PQgetisnull(res, row, col)) {
    lua_pushlightuserdata(L, NULL);
    return;
  }

  v = PQgetvalue(res, row, col);

  switch (type) {
  case OID_BOOL:
    lua_pushboolean(L, v[0] == 't');
    return;

  case OID_INT2:
  case OID_INT4:
  case OID_OID:
  case OID_FLOAT4:
  case OID_FLOAT8:
    lua_pushnumber(L, strtod(v, NULL));
    return;

  case OID_INT8:
    /* A double represents every integer up to 2^53 exactly; beyond that the
     * value stays a string so no digit is lost. */
    errno = 0;
    ll = strtoll(v, &end, 10);
    if (errno == 0 && *end == '\0' && ll <= (1LL << 53) && ll >= -(1LL << 53)) {
      lua_pushnumber(L, (lua_Number) ll);

    } else {
      lua_pushstring(L, v);
    }
    return;

  case OID_BYTEA: {
    unsigned char *raw = PQunescapeBytea((const unsigned char *) v, &len);

    if (raw == NULL) {
      luaL_error(L, "out of memory decoding a bytea value");
      return;
    }

    lua_pushlstring(L, (const char *) raw, len);
    PQfreemem(raw);
    return;
  }

  default:
    lua_pushlstring(L, v, (size_t) PQgetlength(res, row, col));
    return;
  }
}


/* Pushes the result table: rows keyed by column name, plus columns,
 * affected and command. */
static void
push_result(lua_State *L, const PGresult *res)
{
  int rows = PQntuples(res);
  int cols = PQnfields(res);
  int r, f;

  lua_createtable(L, rows, 3);

  for (r = 0; r < rows; r++) {
    lua_createtable(L, 0, cols);
    for (f = 0; f < cols; f++) {
      push_value(L, res, r, f, PQftype(res, f));
      lua_setfield(L, -2, PQfname(res, f));
    }
    lua_rawseti(L, -2, r + 1);
  }

  lua_createtable(L, cols, 0);
  for (f = 0; f < cols; f++) {
    lua_pushstring(L, PQfname(res, f));
    lua_rawseti(L, -2, f + 1);
  }
  lua_setfield(L, -2, "columns");

  lua_pushnumber(L, strtod(PQcmdTuples((PGresult *) res), NULL));
  lua_setfield(L, -2, "affected");
  lua_pushstring(L, PQcmdStatus((PGresult *) res));
  lua_setfield(L, -2, "command");
}


/* Returns non-zero for an SQLSTATE that means the server went away or is
 * not accepting connections: class 08 and admin_shutdown, crash_shutdown,
 * cannot_connect_now. */
static int
sqlstate_unavailable(const char *state)
{
  return state == NULL || strncmp(state, "08", 2) == 0 ||
         strcmp(state, "57P01") == 0 || strcmp(state, "57P02") == 0 ||
         strcmp(state, "57P03") == 0;
}


/* Pushes nil, message, code for a failed result. The message is the
 * server's primary message only: DETAIL lines may quote row values. */
static int
push_result_error(lua_State *L, jv_pg_conn_t *c, const PGresult *res)
{
  const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
  char message[512];
  char *quote;

  if (primary == NULL) {
    primary = PQresultErrorMessage(res);
  }

  copy_message(message, sizeof(message), primary);

  /* Data exceptions (class 22) quote the offending input, which may be a
   * secret passed as a parameter, after ": \"".
   * NOTE: this covers the messages the server formats that way, not every
   * message an extension or a RAISE could produce. */
  if (state != NULL && strncmp(state, "22", 2) == 0) {
    quote = strstr(message, ": \"");
    if (quote != NULL) {
      *quote = '\0';
    }
  }

  if (sqlstate_unavailable(state) || PQstatus(c->pg) == CONNECTION_BAD) {
    return push_failure(L, message, unavailable);
  }

  return push_failure(L, message, state);
}


/* Ends the current query: pushes its result, sends the next queued query,
 * then resumes the caller. */
static void
conn_finish_query(jv_pg_conn_t *c)
{
  jv_pg_query_t *q = c->current;
  PGresult *res = c->result;
  int ref = q->ref, nret = 0;
  ExecStatusType status;
  lua_State *co;

  c->current = NULL;
  c->result = NULL;
  q->ref = LUA_NOREF;
  uv_timer_stop(&q->timer);

  /* A cancel grace timer is armed only while an abandoned query runs. */
  conn_timer_stop(c);

  if (ref != LUA_NOREF) {
    co = jv__co_thread(ref);
    status = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;

    if (res == NULL) {
      nret = push_failure(co, "the query returned no result", unavailable);

    } else if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK ||
               status == PGRES_EMPTY_QUERY) {
      push_result(co, res);
      nret = 1;

    } else {
      nret = push_result_error(co, c, res);
    }
  }

  PQclear(res);
  query_free(q);
  conn_dispatch(c);
  conn_update_ref(c);

  if (ref != LUA_NOREF) {
    jv__co_resume(ref, nret);
  }
}


/* Sends queued bytes; returns 0, or -1 after failing the connection. */
static int
conn_flush(jv_pg_conn_t *c)
{
  int rc = PQflush(c->pg);

  if (rc < 0) {
    conn_fail(c, PQerrorMessage(c->pg));
    return -1;
  }

  /* Wait for writability only while libpq has output queued. */
  if (conn_poll_start(c, UV_READABLE | (rc == 1 ? UV_WRITABLE : 0), 0) != 0) {
    conn_fail(c, "cannot watch the connection's socket");
    return -1;
  }

  return 0;
}


/* Sends the next queued query when none is running. */
static void
conn_dispatch(jv_pg_conn_t *c)
{
  jv_pg_query_t *q = c->head;

  if (c->state != PG_READY || c->current != NULL || q == NULL) {
    return;
  }

  c->head = q->next;
  if (c->head == NULL) {
    c->tail = NULL;
  }
  q->next = NULL;
  c->current = q;

  if (!PQsendQueryParams(c->pg, q->sql, q->nparams, q->types, q->values,
                         q->lengths, q->formats, 0)) {
    conn_fail(c, PQerrorMessage(c->pg));
    return;
  }

  conn_flush(c);
}


/* Moves notifications from libpq into the connection's queue. */
static void
conn_collect_notes(jv_pg_conn_t *c)
{
  PGnotify *n;

  while ((n = PQnotifies(c->pg)) != NULL) {
    size_t clen = strlen(n->relname), plen = strlen(n->extra);
    jv_pg_note_t *note = malloc(sizeof(*note) + clen + plen + 2);

    if (note == NULL) {
      jv_log(JV_LOG_ALERT, "out of memory keeping a notification", NULL);
      PQfreemem(n);
      continue;
    }

    note->next = NULL;
    note->pid = n->be_pid;
    note->channel_len = clen;
    note->payload_len = plen;
    memcpy(note->data, n->relname, clen + 1);
    memcpy(note->data + clen + 1, n->extra, plen + 1);
    PQfreemem(n);

    if (c->notes_tail != NULL) {
      c->notes_tail->next = note;

    } else {
      c->notes = note;
    }
    c->notes_tail = note;
    c->notes_len++;

    if (c->notes_len > PG_MAX_NOTIFICATIONS) {
      jv_pg_note_t *old = c->notes;

      c->notes = old->next;
      c->notes_len--;
      free(old);
      jv_log(JV_LOG_WARN, "dropped the oldest unread notification", "max",
             "10000", NULL);
    }
  }
}


/* Pushes channel, payload, pid of the oldest notification and frees it. */
static int
push_note(lua_State *L, jv_pg_conn_t *c)
{
  jv_pg_note_t *note = c->notes;

  c->notes = note->next;
  if (c->notes == NULL) {
    c->notes_tail = NULL;
  }
  c->notes_len--;

  lua_pushlstring(L, note->data, note->channel_len);
  lua_pushlstring(L, note->data + note->channel_len + 1, note->payload_len);
  lua_pushinteger(L, note->pid);
  free(note);
  return 3;
}


static void
conn_notify_timer_stop(jv_pg_conn_t *c)
{
  if (c->notify_timer != NULL) {
    uv_close((uv_handle_t *) c->notify_timer, handle_free_cb);
    c->notify_timer = NULL;
  }
}


/* Hands the oldest notification to a waiting coroutine, if any. Returns
 * the reference to resume with 3 values, or LUA_NOREF. */
static int
conn_take_notify_waiter(jv_pg_conn_t *c)
{
  int ref = c->notify_ref;

  if (ref == LUA_NOREF || c->notes == NULL) {
    return LUA_NOREF;
  }

  c->notify_ref = LUA_NOREF;
  conn_notify_timer_stop(c);
  push_note(jv__co_thread(ref), c);
  return ref;
}


/*
 * Fails the connection: the running and queued queries and a notification
 * waiter get nil, message, "database_unavailable", and the socket closes.
 * Every coroutine is resumed on the next loop iteration, so this is safe
 * from a callback and from a running coroutine alike.
 */
static void
conn_fail(jv_pg_conn_t *c, const char *message)
{
  jv_pg_query_t *q, *next;

  if (c->state == PG_BROKEN || c->state == PG_CLOSED) {
    return;
  }

  c->state = PG_BROKEN;
  copy_message(c->error, sizeof(c->error), message);
  jv_log(JV_LOG_WARN, "postgres connection lost", "error", c->error, NULL);

  PQclear(c->result);
  c->result = NULL;
  conn_timer_stop(c);

  q = c->current;
  c->current = NULL;
  if (q != NULL) {
    query_fail_later(q, c->error, unavailable);
  }

  q = c->head;
  c->head = c->tail = NULL;
  for (; q != NULL; q = next) {
    next = q->next;
    query_fail_later(q, c->error, unavailable);
  }

  if (c->notify_ref != LUA_NOREF) {
    push_failure(jv__co_thread(c->notify_ref), c->error, unavailable);
    jv__co_resume_later(c->notify_ref, 3);
    c->notify_ref = LUA_NOREF;
    conn_notify_timer_stop(c);
  }

  conn_poll_close(c, 1);
  c->pg = NULL;
}


/* Reads what the server sent: results for the running query and
 * notifications, which may arrive at any time, even between queries. */
static void
conn_read(jv_pg_conn_t *c)
{
  int notify_ref;
  PGresult *res;

  if (!PQconsumeInput(c->pg)) {
    conn_fail(c, PQerrorMessage(c->pg));
    return;
  }

  while (c->current != NULL && !PQisBusy(c->pg)) {
    res = PQgetResult(c->pg);
    if (res == NULL) {
      conn_collect_notes(c);
      notify_ref = conn_take_notify_waiter(c);
      conn_finish_query(c);
      if (notify_ref != LUA_NOREF) {
        jv__co_resume_later(notify_ref, 3);
      }
      return;
    }

    switch (PQresultStatus(res)) {
    case PGRES_COPY_IN:
    case PGRES_COPY_OUT:
    case PGRES_COPY_BOTH:
      PQclear(res);
      conn_fail(c, "COPY is not supported by conn:query");
      return;

    default:
      break;
    }

    /* One statement gives one result; keep the last in case of more. */
    PQclear(c->result);
    c->result = res;
  }

  conn_collect_notes(c);

  if (PQstatus(c->pg) == CONNECTION_BAD) {
    conn_fail(c, PQerrorMessage(c->pg));
    return;
  }

  notify_ref = conn_take_notify_waiter(c);
  if (notify_ref != LUA_NOREF) {
    conn_update_ref(c);
    jv__co_resume(notify_ref, 3);
  }
}


/* ---- connecting ---- */

/* Extracts the SQLSTATE that a verbose libpq message carries after the
 * severity ("FATAL:  3D000: ..."), or returns NULL. */
static const char *
connect_sqlstate(const char *message, char *state)
{
  const char *p = strstr(message, "FATAL:  ");
  int i;

  if (p == NULL) {
    return NULL;
  }

  p += 8;
  for (i = 0; i < 5; i++) {
    if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'A' && p[i] <= 'Z'))) {
      return NULL;
    }
    state[i] = p[i];
  }

  if (p[5] != ':') {
    return NULL;
  }

  state[5] = '\0';
  return state;
}


/* Builds the message for a failed connect from libpq's verbose message,
 * without the SQLSTATE and the LOCATION line that verbosity adds. */
static void
connect_message(char *buf, size_t size, const char *message)
{
  char state[6];
  const char *p = strstr(message, "FATAL:  ");
  const char *location = strstr(message, "\nLOCATION:");
  size_t head, n;
  char tmp[512];

  n = strlen(message);
  if (location != NULL) {
    n = (size_t) (location - message);
  }

  if (p != NULL && connect_sqlstate(message, state) != NULL) {
    /* Drop "NNNNN: " after "FATAL:  ". */
    head = (size_t) (p - message) + 8;
    snprintf(tmp, sizeof(tmp), "%.*s%.*s", (int) head, message,
             (int) (n > head + 7 ? n - head - 7 : 0), message + head + 7);

  } else {
    snprintf(tmp, sizeof(tmp), "%.*s", (int) n, message);
  }

  copy_message(buf, size, tmp);
}


/* Resumes the connecting coroutine with the userdata or an error. */
static void
connect_done(jv_pg_conn_t *c, const char *message, const char *code)
{
  int ref = c->connect_ref;
  lua_State *co = jv__co_thread(ref);
  int nret = 1;

  c->connect_ref = LUA_NOREF;
  conn_timer_stop(c);

  if (message == NULL) {
    c->state = PG_READY;
    PQsetErrorVerbosity(c->pg, PQERRORS_DEFAULT);
    lua_rawgeti(co, LUA_REGISTRYINDEX, c->self_ref);
    conn_update_ref(c);

  } else {
    c->state = PG_BROKEN;
    copy_message(c->error, sizeof(c->error), message);
    conn_poll_close(c, 1);
    c->pg = NULL;
    nret = push_failure(co, c->error, code);
  }

  luaL_unref(jv__lua(), LUA_REGISTRYINDEX, c->self_ref);
  c->self_ref = LUA_NOREF;
  jv__co_resume(ref, nret);
}


static void
connect_fail(jv_pg_conn_t *c, const char *pq_message)
{
  char message[512];
  char state[6];
  const char *code = unavailable;

  if (connect_sqlstate(pq_message, state) != NULL &&
      !sqlstate_unavailable(state)) {
    code = state;
  }

  connect_message(message, sizeof(message), pq_message);
  connect_done(c, message, code);
}


/* Advances PQconnectPoll by one step and waits for the event it requests. */
static void
connect_step(jv_pg_conn_t *c)
{
  int events;

  switch (PQconnectPoll(c->pg)) {
  case PGRES_POLLING_OK:
    if (PQsetnonblocking(c->pg, 1) != 0 ||
        conn_poll_start(c, UV_READABLE, 1) != 0) {
      connect_fail(c, "cannot watch the connection's socket");
      return;
    }
    connect_done(c, NULL, NULL);
    return;

  case PGRES_POLLING_READING:
    events = UV_READABLE;
    break;

  case PGRES_POLLING_WRITING:
    events = UV_WRITABLE;
    break;

  default:
    connect_fail(c, PQerrorMessage(c->pg));
    return;
  }

  /* libpq may have closed its socket and opened another, possibly with
   * the same number, when it tried the next address or dropped SSL. */
  if (conn_poll_start(c, events, 1) != 0) {
    connect_fail(c, "cannot watch the connection's socket");
  }
}


static void
connect_timeout_cb(uv_timer_t *timer)
{
  jv_pg_conn_t *c = timer->data;
  char message[96];

  snprintf(message, sizeof(message), "connecting timed out after %g s",
           c->timeout);
  connect_done(c, message, unavailable);
}


static void
conn_poll_cb(uv_poll_t *handle, int status, int events)
{
  jv_pg_conn_t *c = handle->data;

  if (c->state == PG_CONNECTING) {
    connect_step(c);
    return;
  }

  if (c->state != PG_READY) {
    return;
  }

  if (status < 0) {
    conn_fail(c, uv_strerror(status));
    return;
  }

  if ((events & UV_WRITABLE) && conn_flush(c) != 0) {
    return;
  }

  if (events & UV_READABLE) {
    conn_read(c);
  }
}


static void
notice_cb(void *arg, const PGresult *res)
{
  const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);

  /* Notices such as "table does not exist, skipping" are routine, and a
   * RAISE NOTICE may carry data, so they are debug lines only. */
  jv_log(JV_LOG_DEBUG, "postgres notice", "message", primary ? primary : "",
         NULL);
}


static jv_pg_conn_t *
check_conn(lua_State *L, int idx)
{
  jv_pg_conn_t *c = luaL_checkudata(L, idx, JV_PG_CONN_MT);

  if (c->state == PG_CLOSED) {
    luaL_error(L, "attempt to use a closed postgres connection");
  }

  return c;
}


static double
check_timeout(lua_State *L, int idx, const char *field, double def)
{
  double t;

  lua_getfield(L, idx, field);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return def;
  }

  t = lua_tonumber(L, -1);
  if (lua_type(L, -1) != LUA_TNUMBER || t < 0) {
    luaL_error(L, "option %s must be a number of seconds >= 0", field);
  }

  lua_pop(L, 1);
  return t;
}


/*
 * pg.connect([conninfo [, opts]]): conninfo is a libpq connection string
 * or URI, a table of libpq keywords, or nil for libpq's defaults and the
 * PG* environment variables. opts.timeout (seconds, default 30, 0 for
 * none) bounds the connect and each query.
 */
static int
l_connect(lua_State *L)
{
  const char *keywords[PG_MAX_CONNECT_PARAMS + 1];
  const char *values[PG_MAX_CONNECT_PARAMS + 1];
  int n = 0, expand = 0;
  double timeout = PG_DEFAULT_TIMEOUT;
  const char *load_error;
  jv_pg_conn_t *c;

  if (lua_type(L, 2) == LUA_TTABLE) {
    timeout = check_timeout(L, 2, "timeout", PG_DEFAULT_TIMEOUT);

  } else if (!lua_isnoneornil(L, 2)) {
    return luaL_argerror(L, 2, "table of options expected");
  }

  switch (lua_type(L, 1)) {
  case LUA_TNONE:
  case LUA_TNIL:
    break;

  case LUA_TSTRING:
    /* expand_dbname makes libpq parse the string as conninfo or URI. */
    keywords[n] = "dbname";
    values[n++] = lua_tostring(L, 1);
    expand = 1;
    break;

  case LUA_TTABLE:
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
      if (lua_type(L, -2) != LUA_TSTRING ||
          (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)) {
        return luaL_argerror(L, 1,
                             "keys and values must be strings "
                             "(numbers allowed as values)");
      }

      if (n == PG_MAX_CONNECT_PARAMS) {
        return luaL_argerror(L, 1, "too many connection parameters");
      }

      /* lua_tostring converts a number value in place; the table keeps
       * the strings alive until libpq copies them. */
      keywords[n] = lua_tostring(L, -2);
      values[n++] = lua_tostring(L, -1);
      lua_pop(L, 1);
    }
    break;

  default:
    return luaL_argerror(L, 1, "connection string, table or nil expected");
  }

  keywords[n] = NULL;
  values[n] = NULL;

  /* Load libpq before the userdata exists, because its __gc calls libpq. */
  load_error = jv__pq_load();
  if (load_error != NULL) {
    return push_failure(L, load_error, "library_unavailable");
  }

  c = lua_newuserdata(L, sizeof(*c));
  memset(c, 0, sizeof(*c));
  c->self_ref = LUA_NOREF;
  c->connect_ref = LUA_NOREF;
  c->notify_ref = LUA_NOREF;
  c->timeout = timeout;
  c->state = PG_BROKEN;
  luaL_getmetatable(L, JV_PG_CONN_MT);
  lua_setmetatable(L, -2);

  /* jv__co_park raises outside a managed coroutine: check that before
   * anything needs undoing. */
  if (!jv__co_parkable(L)) {
    jv__co_park(L);
  }

  /* NOTE: libpq resolves a host name with a blocking getaddrinfo inside
   * this call; a socket directory, an IP literal or hostaddr avoids it. */
  c->pg = PQconnectStartParams(keywords, values, expand);
  if (c->pg == NULL) {
    return luaL_error(L, "out of memory");
  }

  if (PQstatus(c->pg) == CONNECTION_BAD) {
    copy_message(c->error, sizeof(c->error), PQerrorMessage(c->pg));
    PQfinish(c->pg);
    c->pg = NULL;
    return push_failure(L, c->error, unavailable);
  }

  /* Verbose messages carry the SQLSTATE of a rejected login, which libpq
   * offers no other way to read before a connection exists. */
  PQsetErrorVerbosity(c->pg, PQERRORS_VERBOSE);
  PQsetNoticeReceiver(c->pg, notice_cb, NULL);
  c->state = PG_CONNECTING;

  if (conn_poll_start(c, UV_WRITABLE, 1) != 0) {
    copy_message(c->error, sizeof(c->error),
                 "cannot watch the connection's socket");
    c->state = PG_BROKEN;
    conn_poll_close(c, 1);
    c->pg = NULL;
    return push_failure(L, c->error, unavailable);
  }

  if (timeout > 0 && conn_timer_start(c, connect_timeout_cb,
                                      (uint64_t) (timeout * 1000)) != 0) {
    c->state = PG_BROKEN;
    conn_poll_close(c, 1);
    c->pg = NULL;
    return luaL_error(L, "out of memory");
  }

  lua_pushvalue(L, -1);
  c->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  c->connect_ref = jv__co_park(L);
  conn_update_ref(c);
  return lua_yield(L, 0);
}


/* Queues q on c, sends it when the connection is free and parks. */
static int
query_submit(lua_State *L, jv_pg_conn_t *c, jv_pg_query_t *q, double timeout)
{
  q->ref = jv__co_park(L);

  if (c->tail != NULL) {
    c->tail->next = q;

  } else {
    c->head = q;
  }
  c->tail = q;

  q->timeout = timeout;
  if (timeout > 0) {
    uv_timer_start(&q->timer, query_timeout_cb, (uint64_t) (timeout * 1000), 0);
  }

  conn_dispatch(c);
  conn_update_ref(c);
  return lua_yield(L, 0);
}


/* Returns the timeout from an options table at idx, else the
 * connection's. */
static double
query_timeout(lua_State *L, jv_pg_conn_t *c, int idx)
{
  if (lua_isnoneornil(L, idx)) {
    return c->timeout;
  }

  luaL_checktype(L, idx, LUA_TTABLE);
  return check_timeout(L, idx, "timeout", c->timeout);
}


/*
 * conn:query(sql [, params [, opts]]): runs one statement with params as
 * $1, $2, ... and returns the result, or nil, message, code. Waits behind
 * queries already queued on the connection.
 */
static int
l_conn_query(lua_State *L)
{
  jv_pg_conn_t *c = check_conn(L, 1);
  size_t len;
  const char *sql = luaL_checklstring(L, 2, &len);
  double timeout;
  jv_pg_query_t *q;

  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
  }

  timeout = query_timeout(L, c, 4);

  if (!jv__co_parkable(L)) {
    jv__co_park(L);
  }

  if (c->state != PG_READY) {
    return push_failure(L, c->error, unavailable);
  }

  q = query_new(L, c, sql, len, lua_isnoneornil(L, 3) ? 0 : 3);
  return query_submit(L, c, q, timeout);
}


/* Runs "<verb> <quoted channel>" for listen and unlisten. */
static int
channel_command(lua_State *L, const char *verb)
{
  jv_pg_conn_t *c = check_conn(L, 1);
  size_t len;
  const char *channel = luaL_checklstring(L, 2, &len);
  char *ident, *sql;
  jv_pg_query_t *q;
  size_t sql_len;

  luaL_argcheck(L, len > 0, 2, "channel must not be empty");

  if (!jv__co_parkable(L)) {
    jv__co_park(L);
  }

  if (c->state != PG_READY) {
    return push_failure(L, c->error, unavailable);
  }

  ident = PQescapeIdentifier(c->pg, channel, len);
  if (ident == NULL) {
    return luaL_argerror(L, 2, "channel is not valid in the client encoding");
  }

  sql_len = strlen(verb) + 1 + strlen(ident);
  sql = malloc(sql_len + 1);
  if (sql == NULL) {
    PQfreemem(ident);
    return luaL_error(L, "out of memory");
  }

  snprintf(sql, sql_len + 1, "%s %s", verb, ident);
  PQfreemem(ident);
  lua_pushlstring(L, sql, sql_len);
  free(sql);

  q = query_new(L, c, lua_tostring(L, -1), sql_len, 0);
  return query_submit(L, c, q, c->timeout);
}


static int
l_conn_listen(lua_State *L)
{
  return channel_command(L, "LISTEN");
}


static int
l_conn_unlisten(lua_State *L)
{
  return channel_command(L, "UNLISTEN");
}


/* conn:notifications(): takes every queued notification, oldest first, as
 * an array of { channel =, payload =, pid = } without waiting. */
static int
l_conn_notifications(lua_State *L)
{
  jv_pg_conn_t *c = luaL_checkudata(L, 1, JV_PG_CONN_MT);
  int i = 0;

  lua_createtable(L, (int) c->notes_len, 0);
  while (c->notes != NULL) {
    lua_createtable(L, 0, 3);
    push_note(L, c);
    lua_setfield(L, -4, "pid");
    lua_setfield(L, -3, "payload");
    lua_setfield(L, -2, "channel");
    lua_rawseti(L, -2, ++i);
  }

  return 1;
}


static void
notify_timeout_cb(uv_timer_t *timer)
{
  jv_pg_conn_t *c = timer->data;
  int ref = c->notify_ref;

  c->notify_ref = LUA_NOREF;
  conn_notify_timer_stop(c);
  conn_update_ref(c);
  push_failure(jv__co_thread(ref), "timed out waiting for a notification",
               "timeout");
  jv__co_resume(ref, 3);
}


/* conn:wait_notification([timeout]): returns channel, payload, pid of the
 * oldest notification, waiting for one up to timeout seconds (default:
 * forever). */
static int
l_conn_wait_notification(lua_State *L)
{
  jv_pg_conn_t *c = luaL_checkudata(L, 1, JV_PG_CONN_MT);
  double timeout = luaL_optnumber(L, 2, -1);

  luaL_argcheck(L, lua_isnoneornil(L, 2) || timeout >= 0, 2, "must be >= 0");

  if (c->notes != NULL) {
    return push_note(L, c);
  }

  if (c->state == PG_CLOSED) {
    return luaL_error(L, "attempt to use a closed postgres connection");
  }

  if (c->state != PG_READY) {
    return push_failure(L, c->error, unavailable);
  }

  if (c->notify_ref != LUA_NOREF) {
    return luaL_error(L, "connection already has a coroutine waiting for "
                         "notifications");
  }

  c->notify_ref = jv__co_park(L);

  if (timeout >= 0) {
    c->notify_timer = malloc(sizeof(*c->notify_timer));
    if (c->notify_timer == NULL) {
      return luaL_error(L, "out of memory");
    }

    uv_timer_init(jv__loop(), c->notify_timer);
    c->notify_timer->data = c;
    uv_timer_start(c->notify_timer, notify_timeout_cb,
                   (uint64_t) (timeout * 1000), 0);
  }

  conn_update_ref(c);
  return lua_yield(L, 0);
}


/* Closes the connection; waiting coroutines get nil, message, "closed". */
static void
conn_close(jv_pg_conn_t *c)
{
  jv_pg_query_t *q, *next;
  jv_pg_note_t *note;

  if (c->state == PG_CLOSED) {
    return;
  }

  if (c->state == PG_READY && c->current != NULL) {
    /* Without a cancel the server would run the query to its end. */
    conn_send_cancel(c);
  }

  c->state = PG_CLOSED;
  snprintf(c->error, sizeof(c->error), "connection closed");
  PQclear(c->result);
  c->result = NULL;
  conn_timer_stop(c);

  q = c->current;
  c->current = NULL;
  if (q != NULL) {
    query_fail_later(q, c->error, "closed");
  }

  q = c->head;
  c->head = c->tail = NULL;
  for (; q != NULL; q = next) {
    next = q->next;
    query_fail_later(q, c->error, "closed");
  }

  if (c->notify_ref != LUA_NOREF) {
    push_failure(jv__co_thread(c->notify_ref), c->error, "closed");
    jv__co_resume_later(c->notify_ref, 3);
    c->notify_ref = LUA_NOREF;
  }
  conn_notify_timer_stop(c);

  while ((note = c->notes) != NULL) {
    c->notes = note->next;
    free(note);
  }
  c->notes_tail = NULL;
  c->notes_len = 0;

  conn_poll_close(c, 1);
  c->pg = NULL;
}


static int
l_conn_close(lua_State *L)
{
  conn_close(luaL_checkudata(L, 1, JV_PG_CONN_MT));
  return 0;
}


/* conn:status(): "ready", "broken" (the connection failed; open a new
 * one) or "closed". */
static int
l_conn_status(lua_State *L)
{
  static const char *const names[] = { "connecting", "ready", "broken",
                                       "closed" };
  jv_pg_conn_t *c = luaL_checkudata(L, 1, JV_PG_CONN_MT);

  lua_pushstring(L, names[c->state]);
  return 1;
}


/* conn:transaction_status(): libpq's view between queries: "idle",
 * "active", "intrans", "inerror" or "unknown". */
static int
l_conn_transaction_status(lua_State *L)
{
  static const char *const names[] = { "idle", "active", "intrans", "inerror",
                                       "unknown" };
  jv_pg_conn_t *c = luaL_checkudata(L, 1, JV_PG_CONN_MT);
  PGTransactionStatusType st = PQTRANS_UNKNOWN;

  if (c->state == PG_READY) {
    st = PQtransactionStatus(c->pg);
  }

  lua_pushstring(L, names[st]);
  return 1;
}


static int
l_conn_backend_pid(lua_State *L)
{
  jv_pg_conn_t *c = check_conn(L, 1);

  if (c->state != PG_READY) {
    return push_failure(L, c->error, unavailable);
  }

  lua_pushinteger(L, PQbackendPID(c->pg));
  return 1;
}


/* conn:settimeout(seconds): the default for later queries; 0 for none. */
static int
l_conn_settimeout(lua_State *L)
{
  jv_pg_conn_t *c = check_conn(L, 1);
  double t = luaL_checknumber(L, 2);

  luaL_argcheck(L, t >= 0, 2, "must be >= 0");
  c->timeout = t;
  return 0;
}


static int
l_conn_gc(lua_State *L)
{
  jv_pg_conn_t *c = luaL_checkudata(L, 1, JV_PG_CONN_MT);

  /* Handles close through uv_close and free themselves in their close
   * callbacks, none of which touch c, so c may go with the userdata. */
  conn_close(c);
  return 0;
}


static int
l_conn_tostring(lua_State *L)
{
  jv_pg_conn_t *c = luaL_checkudata(L, 1, JV_PG_CONN_MT);

  lua_pushfstring(L, "justavps.pg.conn (%p, %s)", (void *) c,
                  c->state == PG_READY ? "ready" : c->error);
  return 1;
}


/* pg.bytea(s): marks s as binary data for a query parameter. */
static int
l_bytea(lua_State *L)
{
  luaL_checktype(L, 1, LUA_TSTRING);
  lua_createtable(L, 1, 0);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  luaL_getmetatable(L, JV_PG_BYTEA_MT);
  lua_setmetatable(L, -2);
  return 1;
}


static int
l_now(lua_State *L)
{
  lua_pushnumber(L, (double) jv__now_ms() / 1000.0);
  return 1;
}


/* ---- the waiting parts, in Lua ---- */

static const char pg_lua[] =
    "local methods, connect, now = ...\n"
    "local select, type, pcall, error, unpack, setmetatable, tostring =\n"
    "  select, type, pcall, error, unpack, setmetatable, tostring\n"
    "local floor, min, random = math.floor, math.min, math.random\n"
    "\n"
    "-- core.waiter, looked up on first use: the core table is still being\n"
    "-- built when this chunk runs.\n"
    "local waiter\n"
    "\n"
    "local function pack(...)\n"
    "  return { n = select('#', ...), ... }\n"
    "end\n"
    "\n"
    "function methods.begin(conn)\n"
    "  return conn:query('BEGIN')\n"
    "end\n"
    "\n"
    "function methods.commit(conn)\n"
    "  return conn:query('COMMIT')\n"
    "end\n"
    "\n"
    "function methods.rollback(conn)\n"
    "  return conn:query('ROLLBACK')\n"
    "end\n"
    "\n"
    "function methods.notify(conn, channel, payload)\n"
    "  local res, err, code = conn:query('SELECT pg_notify($1, $2)',\n"
    "    { channel, payload or '' })\n"
    "  if not res then\n"
    "    return nil, err, code\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "\n"
    "-- Runs fn(conn, ...) between BEGIN and COMMIT. When fn raises, rolls\n"
    "-- back and raises again; when fn returns nil, err, code, rolls back\n"
    "-- and returns them. Otherwise commits and returns fn's results.\n"
    "function methods.transaction(conn, fn, ...)\n"
    "  if type(fn) ~= 'function' then\n"
    "    error('bad argument #1 to transaction (function expected)', 2)\n"
    "  end\n"
    "  local ok, err, code = conn:query('BEGIN')\n"
    "  if not ok then\n"
    "    return nil, err, code\n"
    "  end\n"
    "  local r = pack(pcall(fn, conn, ...))\n"
    "  if not r[1] then\n"
    "    if conn:status() == 'ready' then\n"
    "      conn:query('ROLLBACK')\n"
    "    end\n"
    "    error(r[2], 0)\n"
    "  end\n"
    "  if r[2] == nil and r[3] ~= nil then\n"
    "    if conn:status() == 'ready' then\n"
    "      conn:query('ROLLBACK')\n"
    "    end\n"
    "    return nil, r[3], r[4]\n"
    "  end\n"
    "  ok, err, code = conn:query('COMMIT')\n"
    "  if not ok then\n"
    "    return nil, err, code\n"
    "  end\n"
    "  -- COMMIT of a transaction in which a statement failed rolls back.\n"
    "  if ok.command == 'ROLLBACK' then\n"
    "    return nil, 'transaction rolled back because a statement in it '\n"
    "      .. 'failed', '25P02'\n"
    "  end\n"
    "  return unpack(r, 2, r.n)\n"
    "end\n"
    "\n"
    "local Pool = {}\n"
    "Pool.__index = Pool\n"
    "\n"
    "local function check_number(opts, name, default, low)\n"
    "  local v = opts[name]\n"
    "  if v == nil then\n"
    "    return default\n"
    "  end\n"
    "  if type(v) ~= 'number' or v < low then\n"
    "    error('bad option ' .. name .. ' to pg.pool (number >= ' .. low\n"
    "      .. ' expected)', 3)\n"
    "  end\n"
    "  return v\n"
    "end\n"
    "\n"
    "-- pg.pool{conninfo=, size=, max_idle=, timeout=, connect_timeout=,\n"
    "-- query_timeout=}: see docs/api/pg.md.\n"
    "local function new_pool(opts)\n"
    "  if type(opts) ~= 'table' then\n"
    "    error('bad argument #1 to pool (table of options expected)', 2)\n"
    "  end\n"
    "  local size = check_number(opts, 'size', 10, 1)\n"
    "  if size ~= floor(size) then\n"
    "    error('bad option size to pg.pool (integer expected)', 2)\n"
    "  end\n"
    "  return setmetatable({\n"
    "    conninfo = opts.conninfo,\n"
    "    size = size,\n"
    "    max_idle = check_number(opts, 'max_idle', 60, 0),\n"
    "    timeout = check_number(opts, 'timeout', 10, 0),\n"
    "    connect_opts = {\n"
    "      timeout = check_number(opts, 'connect_timeout', 10, 0),\n"
    "    },\n"
    "    query_timeout = check_number(opts, 'query_timeout', 30, 0),\n"
    "    idle = {},        -- { conn, since } pairs, most recent last\n"
    "    total = 0,        -- connections open or being opened\n"
    "    waiters = {},     -- FIFO of core.waiter objects\n"
    "    first = 1,\n"
    "    last = 0,\n"
    "    backoff = 0,      -- seconds; 0 while the server is reachable\n"
    "    retry_at = 0,\n"
    "    last_error = nil,\n"
    "    closed = false,\n"
    "  }, Pool)\n"
    "end\n"
    "\n"
    "local function shift_waiter(pool)\n"
    "  while pool.first <= pool.last do\n"
    "    local w = pool.waiters[pool.first]\n"
    "    pool.waiters[pool.first] = nil\n"
    "    pool.first = pool.first + 1\n"
    "    if w ~= false and w:waiting() then\n"
    "      return w\n"
    "    end\n"
    "  end\n"
    "  return nil\n"
    "end\n"
    "\n"
    "-- Gives a free slot to the first waiter, which then opens a\n"
    "-- connection, or returns the slot to the pool.\n"
    "local function pass_slot(pool)\n"
    "  local w = not pool.closed and shift_waiter(pool)\n"
    "  if w then\n"
    "    w:wake('slot')\n"
    "  else\n"
    "    pool.total = pool.total - 1\n"
    "  end\n"
    "end\n"
    "\n"
    "-- Opens a connection in a slot the caller holds. While the server is\n"
    "-- unreachable, attempts are spaced by a backoff that doubles from\n"
    "-- 50 ms to 2 s, with jitter, and callers fail at once in between.\n"
    "local function open(pool)\n"
    "  if now() < pool.retry_at then\n"
    "    pass_slot(pool)\n"
    "    return nil, 'database unavailable: ' .. tostring(pool.last_error),\n"
    "      'database_unavailable'\n"
    "  end\n"
    "  local conn, err, code = connect(pool.conninfo, pool.connect_opts)\n"
    "  if not conn then\n"
    "    if code == 'database_unavailable' then\n"
    "      pool.backoff = pool.backoff == 0 and 0.05\n"
    "        or min(pool.backoff * 2, 2)\n"
    "      pool.retry_at = now() + pool.backoff * (0.5 + random() * 0.5)\n"
    "      pool.last_error = err\n"
    "    end\n"
    "    pass_slot(pool)\n"
    "    return nil, err, code\n"
    "  end\n"
    "  pool.backoff = 0\n"
    "  pool.retry_at = 0\n"
    "  conn:settimeout(pool.query_timeout)\n"
    "  if pool.closed then\n"
    "    conn:close()\n"
    "    pool.total = pool.total - 1\n"
    "    return nil, 'pool is closed', 'closed'\n"
    "  end\n"
    "  return conn\n"
    "end\n"
    "\n"
    "-- Takes the most recently used healthy idle connection, closing those\n"
    "-- idle longer than max_idle and those that broke while idle.\n"
    "local function take_idle(pool)\n"
    "  local idle, t = pool.idle, now()\n"
    "  local keep = {}\n"
    "  for i = 1, #idle do\n"
    "    local entry = idle[i]\n"
    "    if entry[1]:status() ~= 'ready' or t - entry[2] > pool.max_idle then\n"
    "      entry[1]:close()\n"
    "      pool.total = pool.total - 1\n"
    "    else\n"
    "      keep[#keep + 1] = entry\n"
    "    end\n"
    "  end\n"
    "  pool.idle = keep\n"
    "  local entry = keep[#keep]\n"
    "  if entry then\n"
    "    keep[#keep] = nil\n"
    "    return entry[1]\n"
    "  end\n"
    "  return nil\n"
    "end\n"
    "\n"
    "local function acquire(pool)\n"
    "  if pool.closed then\n"
    "    return nil, 'pool is closed', 'closed'\n"
    "  end\n"
    "  local conn = take_idle(pool)\n"
    "  if conn then\n"
    "    return conn\n"
    "  end\n"
    "  if pool.total < pool.size then\n"
    "    pool.total = pool.total + 1\n"
    "    return open(pool)\n"
    "  end\n"
    "  waiter = waiter or require('justavps.core').waiter\n"
    "  local w = waiter()\n"
    "  pool.last = pool.last + 1\n"
    "  local slot = pool.last\n"
    "  pool.waiters[slot] = w\n"
    "  local got, err = w:wait(pool.timeout)\n"
    "  if got == nil then\n"
    "    if pool.waiters[slot] then\n"
    "      pool.waiters[slot] = false\n"
    "    end\n"
    "    return nil, 'timed out after ' .. pool.timeout .. ' s waiting for '\n"
    "      .. 'a free connection (' .. tostring(err) .. ')', 'timeout'\n"
    "  elseif got == false then\n"
    "    return nil, 'pool is closed', 'closed'\n"
    "  elseif got == 'slot' then\n"
    "    return open(pool)\n"
    "  end\n"
    "  if got:status() ~= 'ready' then\n"
    "    got:close()\n"
    "    return open(pool)\n"
    "  end\n"
    "  return got\n"
    "end\n"
    "\n"
    "-- Returns conn to the pool. A connection that broke, or that is still\n"
    "-- inside a transaction, is closed instead of reused.\n"
    "local function release(pool, conn)\n"
    "  if pool.closed or conn:status() ~= 'ready'\n"
    "    or conn:transaction_status() ~= 'idle' then\n"
    "    conn:close()\n"
    "    pass_slot(pool)\n"
    "    return\n"
    "  end\n"
    "  local w = shift_waiter(pool)\n"
    "  if w then\n"
    "    w:wake(conn)\n"
    "    return\n"
    "  end\n"
    "  pool.idle[#pool.idle + 1] = { conn, now() }\n"
    "end\n"
    "\n"
    "function Pool:query(sql, params, opts)\n"
    "  local conn, err, code = acquire(self)\n"
    "  if not conn then\n"
    "    return nil, err, code\n"
    "  end\n"
    "  local r = pack(pcall(conn.query, conn, sql, params, opts))\n"
    "  release(self, conn)\n"
    "  if not r[1] then\n"
    "    error(r[2], 0)\n"
    "  end\n"
    "  return r[2], r[3], r[4]\n"
    "end\n"
    "\n"
    "function Pool:transaction(fn, ...)\n"
    "  local conn, err, code = acquire(self)\n"
    "  if not conn then\n"
    "    return nil, err, code\n"
    "  end\n"
    "  local r = pack(pcall(conn.transaction, conn, fn, ...))\n"
    "  release(self, conn)\n"
    "  if not r[1] then\n"
    "    error(r[2], 0)\n"
    "  end\n"
    "  return unpack(r, 2, r.n)\n"
    "end\n"
    "\n"
    "function Pool:stats()\n"
    "  return { total = self.total, idle = #self.idle,\n"
    "    waiting = self.last - self.first + 1 }\n"
    "end\n"
    "\n"
    "-- Closes idle connections now and busy ones when they come back;\n"
    "-- coroutines waiting for a connection get nil, message, 'closed'.\n"
    "function Pool:close()\n"
    "  if self.closed then\n"
    "    return\n"
    "  end\n"
    "  self.closed = true\n"
    "  for i = 1, #self.idle do\n"
    "    self.idle[i][1]:close()\n"
    "    self.total = self.total - 1\n"
    "  end\n"
    "  self.idle = {}\n"
    "  local w = shift_waiter(self)\n"
    "  while w do\n"
    "    w:wake(false)\n"
    "    w = shift_waiter(self)\n"
    "  end\n"
    "end\n"
    "\n"
    "return new_pool\n";


int
jv__open_pg(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "connect", l_connect },
                                    { "bytea", l_bytea },
                                    { NULL, NULL } };
  static const luaL_Reg methods[] = {
    { "query", l_conn_query },
    { "listen", l_conn_listen },
    { "unlisten", l_conn_unlisten },
    { "notifications", l_conn_notifications },
    { "wait_notification", l_conn_wait_notification },
    { "close", l_conn_close },
    { "status", l_conn_status },
    { "transaction_status", l_conn_transaction_status },
    { "backend_pid", l_conn_backend_pid },
    { "settimeout", l_conn_settimeout },
    { NULL, NULL }
  };
  int methods_index, table_index;

  luaL_newmetatable(L, JV_PG_BYTEA_MT);
  lua_pop(L, 1);

  luaL_newmetatable(L, JV_PG_CONN_MT);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  methods_index = lua_gettop(L);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "__index");
  lua_pushcfunction(L, l_conn_gc);
  lua_setfield(L, -3, "__gc");
  lua_pushcfunction(L, l_conn_tostring);
  lua_setfield(L, -3, "__tostring");

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  table_index = lua_gettop(L);

  /* NULL as a light userdata equals cjson.null, so JSON encoders write
   * SQL NULLs as null without a conversion step. */
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, table_index, "null");

  if (luaL_loadbuffer(L, pg_lua, sizeof(pg_lua) - 1, "=core.pg") != 0) {
    lua_error(L);
    return 0;
  }

  lua_pushvalue(L, methods_index);
  lua_pushcfunction(L, l_connect);
  lua_pushcfunction(L, l_now);
  lua_call(L, 3, 1);
  lua_setfield(L, table_index, "pool");

  /* Leave only the module table: drop the metatable and methods. */
  lua_replace(L, -3);
  lua_pop(L, 1);
  return 1;
}
