/*
 * co.c: the coroutine scheduler and the core.* loop functions.
 *
 * Lua code that waits for I/O runs in coroutines started here. A binding
 * parks the running coroutine (jv__co_park), yields, and the libuv callback
 * that completes the operation resumes it. The model is the one OpenResty's
 * cosockets use: handler code reads top to bottom, the loop never blocks.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Registry key of a weak-keyed table: managed coroutine -> name. Only
 * coroutines in it may be parked, so a core call made inside a user's own
 * coroutine.wrap raises a clear error instead of yielding to the wrong
 * resumer. */
static char managed_key;

static lua_State *anchor_L;

typedef struct {
  int ref;
  int nargs;
} jv_pending_t;

static struct {
  uv_idle_t idle;
  int idle_init;
  jv_pending_t *items;
  size_t len;
  size_t cap;
} pending;


uv_loop_t *
jv__loop(void)
{
  return uv_default_loop();
}


uint64_t
jv__now_ms(void)
{
  return uv_now(jv__loop());
}


lua_State *
jv__lua(void)
{
  return anchor_L;
}


void
jv__co_log_error(lua_State *co, const char *where)
{
  lua_State *L = anchor_L;
  const char *msg = lua_tostring(co, -1);

  if (msg == NULL) {
    msg = "(error object is not a string)";
  }

  luaL_traceback(L, co, msg, 0);
  jv_log(JV_LOG_ERR, "lua error", "where", where ? where : "coroutine", "error",
         lua_tostring(L, -1), NULL);
  lua_pop(L, 1);
}


static const char *
co_name(lua_State *L, lua_State *co, char *buf, size_t size)
{
  const char *name;

  lua_pushlightuserdata(L, &managed_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  lua_rawget(L, -2);
  name = lua_tostring(L, -1);
  snprintf(buf, size, "%s", name ? name : "coroutine");
  lua_pop(L, 2);
  return buf;
}


/* Runs one resume step and reports errors. The thread must be anchored by
 * the caller for the duration (it is on anchor_L's stack). */
static int
co_step(lua_State *co, int nargs)
{
  char name[64];
  int rc;

  rc = lua_resume(co, nargs);

  if (rc == LUA_YIELD) {
    return 0;
  }

  if (rc != 0) {
    jv__co_log_error(co, co_name(anchor_L, co, name, sizeof(name)));
    lua_settop(co, 0);
    return -1;
  }

  lua_settop(co, 0);
  return 0;
}


int
jv__co_parkable(lua_State *L)
{
  int ok;

  if (lua_pushthread(L)) {
    lua_pop(L, 1);
    return 0;
  }

  lua_pushlightuserdata(L, &managed_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -2);
  lua_rawget(L, -2);
  ok = !lua_isnil(L, -1);
  lua_pop(L, 3);
  return ok;
}


int
jv__co_park(lua_State *L)
{
  if (!jv__co_parkable(L)) {
    luaL_error(L, "this call waits for I/O and must run in a coroutine "
                  "started by core.spawn or a core callback, not in the main "
                  "chunk or a coroutine.wrap of your own");
    return LUA_NOREF;
  }

  lua_pushthread(L);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}


lua_State *
jv__co_thread(int ref)
{
  lua_State *co;

  lua_rawgeti(anchor_L, LUA_REGISTRYINDEX, ref);
  co = lua_tothread(anchor_L, -1);
  lua_pop(anchor_L, 1);
  return co;
}


void
jv__co_resume(int ref, int nargs)
{
  lua_State *co;

  if (ref == LUA_NOREF || ref == LUA_REFNIL) {
    return;
  }

  lua_rawgeti(anchor_L, LUA_REGISTRYINDEX, ref);
  co = lua_tothread(anchor_L, -1);
  luaL_unref(anchor_L, LUA_REGISTRYINDEX, ref);

  if (co == NULL) {
    lua_pop(anchor_L, 1);
    jv_log(JV_LOG_ALERT, "resume of a reference that is not a thread", NULL);
    return;
  }

  if (lua_status(co) != LUA_YIELD) {
    /* Resuming a running or finished coroutine would push an error onto
     * its stack and corrupt it; a binding that does this has a bug. */
    char name[64];

    lua_settop(co, lua_gettop(co) - nargs);
    lua_pop(anchor_L, 1);
    jv_log(JV_LOG_ALERT, "resume of a coroutine that is not suspended", "where",
           co_name(anchor_L, co, name, sizeof(name)), NULL);
    return;
  }

  co_step(co, nargs);
  lua_pop(anchor_L, 1);
}


void
jv__co_forget(int ref)
{
  if (ref != LUA_NOREF && ref != LUA_REFNIL) {
    luaL_unref(anchor_L, LUA_REGISTRYINDEX, ref);
  }
}


static void
pending_run(uv_idle_t *idle)
{
  jv_pending_t *items = pending.items;
  size_t len = pending.len;
  size_t i;

  /* Resumes may queue more work: take the batch and start a new array. */
  pending.items = NULL;
  pending.len = 0;
  pending.cap = 0;

  for (i = 0; i < len; i++) {
    jv__co_resume(items[i].ref, items[i].nargs);
  }

  free(items);

  if (pending.len == 0) {
    uv_idle_stop(idle);
  }
}


void
jv__co_resume_later(int ref, int nargs)
{
  if (pending.len == pending.cap) {
    size_t cap = pending.cap ? pending.cap * 2 : 16;
    jv_pending_t *items = realloc(pending.items, cap * sizeof(*items));

    if (items == NULL) {
      jv_log(JV_LOG_ALERT, "out of memory queueing a resume", NULL);
      abort();
    }

    pending.items = items;
    pending.cap = cap;
  }

  pending.items[pending.len].ref = ref;
  pending.items[pending.len].nargs = nargs;
  pending.len++;

  if (!pending.idle_init) {
    uv_idle_init(jv__loop(), &pending.idle);
    pending.idle_init = 1;
  }

  uv_idle_start(&pending.idle, pending_run);
}


int
jv__co_start(lua_State *L, int nargs, const char *name)
{
  lua_State *co;
  int rc;

  luaL_checktype(L, -(nargs + 1), LUA_TFUNCTION);

  co = lua_newthread(L);

  /* managed[co] = name */
  lua_pushlightuserdata(L, &managed_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -2);
  lua_pushstring(L, name ? name : "coroutine");
  lua_rawset(L, -3);
  lua_pop(L, 1);

  /* Move the thread below the function, then the function and arguments
   * onto the thread. The thread stays anchored on L during the first step. */
  lua_insert(L, -(nargs + 2));
  lua_xmove(L, co, nargs + 1);

  lua_xmove(L, anchor_L, 1);
  rc = co_step(co, nargs);
  lua_pop(anchor_L, 1);
  return rc;
}


/* core.spawn(fn, ...): runs fn in a new coroutine until it first waits. */
static int
l_spawn(lua_State *L)
{
  int nargs = lua_gettop(L) - 1;

  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_pushboolean(L, jv__co_start(L, nargs, "spawn") == 0);
  return 1;
}


typedef struct {
  uv_timer_t timer;
  int ref;
} jv_sleep_t;


static void
sleep_close_cb(uv_handle_t *handle)
{
  free(handle->data);
}


static void
sleep_timer_cb(uv_timer_t *timer)
{
  jv_sleep_t *sl = timer->data;
  int ref = sl->ref;

  uv_close((uv_handle_t *) timer, sleep_close_cb);
  jv__co_resume(ref, 0);
}


/* core.sleep(seconds): parks the coroutine for at least that long. A sleep
 * of 0 yields to the loop once. */
static int
l_sleep(lua_State *L)
{
  double seconds = luaL_checknumber(L, 1);
  jv_sleep_t *sl;

  luaL_argcheck(L, seconds >= 0, 1, "must be >= 0");

  sl = malloc(sizeof(*sl));
  if (sl == NULL) {
    return luaL_error(L, "out of memory");
  }

  sl->ref = jv__co_park(L);
  uv_timer_init(jv__loop(), &sl->timer);
  sl->timer.data = sl;
  uv_timer_start(&sl->timer, sleep_timer_cb, (uint64_t) (seconds * 1000), 0);
  return lua_yield(L, 0);
}


/*
 * Timers with a Lua callback: core.timer(seconds, fn [, repeat_seconds]).
 * Each firing runs fn in a new coroutine, so fn may wait for I/O.
 */
#define JV_TIMER_MT "justavps.timer"

typedef struct {
  uv_timer_t timer;
  int fn_ref;
  int closed;
} jv_timer_t;


static void
timer_close_cb(uv_handle_t *handle)
{
  free(handle->data);
}


static void
timer_fire(uv_timer_t *t)
{
  jv_timer_t *tm = t->data;
  lua_State *L = anchor_L;

  lua_rawgeti(L, LUA_REGISTRYINDEX, tm->fn_ref);

  if (uv_timer_get_repeat(t) == 0) {
    /* One-shot: release the callback before it runs so it may re-arm. */
    luaL_unref(L, LUA_REGISTRYINDEX, tm->fn_ref);
    tm->fn_ref = LUA_NOREF;
  }

  jv__co_start(L, 0, "timer");
}


typedef struct {
  jv_timer_t *tm;
} jv_timer_box_t;


static int
l_timer(lua_State *L)
{
  double after = luaL_checknumber(L, 1);
  double every = luaL_optnumber(L, 3, 0);
  jv_timer_box_t *box;
  jv_timer_t *tm;

  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_argcheck(L, after >= 0, 1, "must be >= 0");
  luaL_argcheck(L, every >= 0, 3, "must be >= 0");

  tm = calloc(1, sizeof(*tm));
  if (tm == NULL) {
    return luaL_error(L, "out of memory");
  }

  lua_pushvalue(L, 2);
  tm->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_timer_init(jv__loop(), &tm->timer);
  tm->timer.data = tm;
  uv_timer_start(&tm->timer, timer_fire, (uint64_t) (after * 1000),
                 (uint64_t) (every * 1000));

  box = lua_newuserdata(L, sizeof(*box));
  box->tm = tm;
  luaL_getmetatable(L, JV_TIMER_MT);
  lua_setmetatable(L, -2);
  return 1;
}


/* timer:stop(): cancels the timer; safe to call twice. Dropping the last
 * reference does not stop a timer: a repeating timer runs until stopped. */
static int
l_timer_stop(lua_State *L)
{
  jv_timer_box_t *box = luaL_checkudata(L, 1, JV_TIMER_MT);
  jv_timer_t *tm = box->tm;

  if (tm == NULL || tm->closed) {
    return 0;
  }

  tm->closed = 1;
  luaL_unref(L, LUA_REGISTRYINDEX, tm->fn_ref);
  tm->fn_ref = LUA_NOREF;
  uv_close((uv_handle_t *) &tm->timer, timer_close_cb);
  box->tm = NULL;
  return 0;
}


/* core.now(): the loop's monotonic clock in seconds (millisecond steps). */
static int
l_now(lua_State *L)
{
  lua_pushnumber(L, (double) uv_now(jv__loop()) / 1000.0);
  return 1;
}


/* core.time(): wall-clock Unix time in seconds with sub-second part. */
static int
l_time(lua_State *L)
{
  struct timespec ts;

  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double) ts.tv_sec + (double) ts.tv_nsec / 1e9);
  return 1;
}


/* core.update_time(): refreshes the loop clock that core.now() reads. */
static int
l_update_time(lua_State *L)
{
  uv_update_time(jv__loop());
  return 0;
}


/* core.run([mode]): runs the loop; mode "default" (until no active
 * handles), "once" or "nowait". Returns true when handles remain. */
static int
l_run(lua_State *L)
{
  static const char *const modes[] = { "default", "once", "nowait", NULL };
  static const uv_run_mode map[] = { UV_RUN_DEFAULT, UV_RUN_ONCE,
                                     UV_RUN_NOWAIT };
  int mode = luaL_checkoption(L, 1, "default", modes);

  if (lua_pushthread(L) == 0) {
    return luaL_error(L, "core.run must be called from the main thread");
  }

  lua_pop(L, 1);
  lua_pushboolean(L, uv_run(jv__loop(), map[mode]) != 0);
  return 1;
}


/* core.stop(): makes core.run return after the current iteration. */
static int
l_stop(lua_State *L)
{
  uv_stop(jv__loop());
  return 0;
}


/* core.parkable(): true when the caller may call functions that wait. */
static int
l_parkable(lua_State *L)
{
  lua_pushboolean(L, jv__co_parkable(L));
  return 1;
}


/*
 * Waiters: the one synchronisation primitive Lua needs to build queues,
 * semaphores and joins. waiter:wait([timeout]) parks until another
 * coroutine calls waiter:wake(...), whose values wait returns. One
 * coroutine may wait on a waiter at a time.
 */
#define JV_WAITER_MT "justavps.waiter"

typedef struct {
  int ref; /* parked coroutine, or LUA_NOREF */
  uv_timer_t *timer;
} jv_waiter_t;


static void
waiter_timer_close_cb(uv_handle_t *handle)
{
  free(handle);
}


static void
waiter_cancel_timer(jv_waiter_t *w)
{
  if (w->timer != NULL) {
    uv_close((uv_handle_t *) w->timer, waiter_timer_close_cb);
    w->timer = NULL;
  }
}


static void
waiter_timeout_cb(uv_timer_t *timer)
{
  jv_waiter_t *w = timer->data;
  int ref = w->ref;
  lua_State *co;

  w->ref = LUA_NOREF;
  waiter_cancel_timer(w);

  co = jv__co_thread(ref);
  lua_pushnil(co);
  lua_pushstring(co, "timeout");
  jv__co_resume(ref, 2);
}


static int
l_waiter(lua_State *L)
{
  jv_waiter_t *w = lua_newuserdata(L, sizeof(*w));

  w->ref = LUA_NOREF;
  w->timer = NULL;
  luaL_getmetatable(L, JV_WAITER_MT);
  lua_setmetatable(L, -2);
  return 1;
}


static int
l_waiter_wait(lua_State *L)
{
  jv_waiter_t *w = luaL_checkudata(L, 1, JV_WAITER_MT);
  double timeout = luaL_optnumber(L, 2, -1);

  if (w->ref != LUA_NOREF) {
    return luaL_error(L, "waiter already has a coroutine waiting");
  }

  w->ref = jv__co_park(L);

  if (timeout >= 0) {
    w->timer = malloc(sizeof(*w->timer));
    if (w->timer == NULL) {
      return luaL_error(L, "out of memory");
    }

    uv_timer_init(jv__loop(), w->timer);
    w->timer->data = w;
    uv_timer_start(w->timer, waiter_timeout_cb, (uint64_t) (timeout * 1000), 0);
  }

  return lua_yield(L, 0);
}


/* waiter:wake(...): returns true if a coroutine was waiting. The waiting
 * coroutine resumes on the next loop iteration with the values. */
static int
l_waiter_wake(lua_State *L)
{
  jv_waiter_t *w = luaL_checkudata(L, 1, JV_WAITER_MT);
  int nargs = lua_gettop(L) - 1;
  int ref = w->ref;
  lua_State *co;

  if (ref == LUA_NOREF) {
    lua_pushboolean(L, 0);
    return 1;
  }

  w->ref = LUA_NOREF;
  waiter_cancel_timer(w);
  co = jv__co_thread(ref);
  lua_xmove(L, co, nargs);
  jv__co_resume_later(ref, nargs);
  lua_pushboolean(L, 1);
  return 1;
}


static int
l_waiter_waiting(lua_State *L)
{
  jv_waiter_t *w = luaL_checkudata(L, 1, JV_WAITER_MT);

  lua_pushboolean(L, w->ref != LUA_NOREF);
  return 1;
}


static void
register_metatable(lua_State *L, const char *name, const luaL_Reg *methods)
{
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}


int
jv__open_loop(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "spawn", l_spawn },
                                    { "sleep", l_sleep },
                                    { "timer", l_timer },
                                    { "now", l_now },
                                    { "time", l_time },
                                    { "update_time", l_update_time },
                                    { "run", l_run },
                                    { "stop", l_stop },
                                    { "parkable", l_parkable },
                                    { "waiter", l_waiter },
                                    { NULL, NULL } };
  static const luaL_Reg timer_methods[] = { { "stop", l_timer_stop },
                                            { NULL, NULL } };
  static const luaL_Reg waiter_methods[] = { { "wait", l_waiter_wait },
                                             { "wake", l_waiter_wake },
                                             { "waiting", l_waiter_waiting },
                                             { NULL, NULL } };

  if (anchor_L == NULL) {
    anchor_L = lua_newthread(L);
    luaL_ref(L, LUA_REGISTRYINDEX);

    lua_pushlightuserdata(L, &managed_key);
    lua_newtable(L);
    lua_newtable(L);
    lua_pushstring(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }

  register_metatable(L, JV_TIMER_MT, timer_methods);
  register_metatable(L, JV_WAITER_MT, waiter_methods);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
