/*
 * signal.c: signal names and numbers, and Lua handlers for signals
 * (core.signal).
 *
 * A handler is a uv_signal_t, so the signal only sets a flag inside libuv
 * and the Lua function runs later from the loop, in its own coroutine,
 * where it may wait for I/O. libuv lets several handles watch one signal,
 * so every handler registered for a signal runs.
 */
#define _GNU_SOURCE /* dladdr, RTLD_NODELETE */

#include "internal.h"

#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define JV_SIGNAL_MT "justavps.signal"

static const struct {
  const char *name;
  int signum;
} signal_names[] = {
  { "SIGHUP", SIGHUP },       { "SIGINT", SIGINT },   { "SIGQUIT", SIGQUIT },
  { "SIGILL", SIGILL },       { "SIGTRAP", SIGTRAP }, { "SIGABRT", SIGABRT },
  { "SIGBUS", SIGBUS },       { "SIGFPE", SIGFPE },   { "SIGKILL", SIGKILL },
  { "SIGUSR1", SIGUSR1 },     { "SIGSEGV", SIGSEGV }, { "SIGUSR2", SIGUSR2 },
  { "SIGPIPE", SIGPIPE },     { "SIGALRM", SIGALRM }, { "SIGTERM", SIGTERM },
  { "SIGCHLD", SIGCHLD },     { "SIGCONT", SIGCONT }, { "SIGSTOP", SIGSTOP },
  { "SIGTSTP", SIGTSTP },     { "SIGTTIN", SIGTTIN }, { "SIGTTOU", SIGTTOU },
  { "SIGURG", SIGURG },       { "SIGXCPU", SIGXCPU }, { "SIGXFSZ", SIGXFSZ },
  { "SIGVTALRM", SIGVTALRM }, { "SIGPROF", SIGPROF }, { "SIGWINCH", SIGWINCH },
  { "SIGIO", SIGIO },         { "SIGSYS", SIGSYS },
};


/* Returns the number of a signal named "SIGTERM" or "TERM" (any case), or
 * 0 when the name is unknown. */
int
jv__signal_number(const char *name)
{
  size_t i;

  if (strncasecmp(name, "SIG", 3) == 0) {
    name += 3;
  }

  for (i = 0; i < JV_ARRAY_SIZE(signal_names); i++) {
    if (strcasecmp(name, signal_names[i].name + 3) == 0) {
      return signal_names[i].signum;
    }
  }

  return 0;
}


/* Returns "SIGTERM" for SIGTERM, or NULL for a number without a name. */
const char *
jv__signal_name(int signum)
{
  size_t i;

  for (i = 0; i < JV_ARRAY_SIZE(signal_names); i++) {
    if (signal_names[i].signum == signum) {
      return signal_names[i].name;
    }
  }

  return NULL;
}


/* Returns the signal at idx, given as a name or a number; 0 (the liveness
 * check of kill(2)) is allowed. Raises on anything else. */
int
jv__check_signal(lua_State *L, int idx)
{
  lua_Integer n;
  int signum;

  if (lua_type(L, idx) == LUA_TNUMBER) {
    n = lua_tointeger(L, idx);
    if (n < 0 || n >= NSIG || (lua_Number) n != lua_tonumber(L, idx)) {
      luaL_argerror(L, idx, "invalid signal number");
    }
    return (int) n;
  }

  signum = jv__signal_number(luaL_checkstring(L, idx));
  if (signum == 0) {
    luaL_argerror(
        L, idx,
        lua_pushfstring(L, "unknown signal name '%s'", lua_tostring(L, idx)));
  }

  return signum;
}


typedef struct {
  uv_signal_t handle;
  int fn_ref;
} jv_signal_t;

typedef struct {
  jv_signal_t *sig; /* NULL once stopped */
} jv_signal_box_t;


static void
signal_close_cb(uv_handle_t *handle)
{
  free(handle->data);
}


static void
signal_cb(uv_signal_t *handle, int signum)
{
  jv_signal_t *sig = handle->data;
  lua_State *L = jv__lua();

  lua_rawgeti(L, LUA_REGISTRYINDEX, sig->fn_ref);
  lua_pushstring(L, jv__signal_name(signum));
  jv__co_start(L, 1, "signal handler");
}


/* core.signal.on(signal, fn): runs fn(name) in a new coroutine each time
 * the signal arrives. Returns a handle with stop(). */
static int
l_signal_on(lua_State *L)
{
  int signum = jv__check_signal(L, 1);
  jv_signal_box_t *box;
  jv_signal_t *sig;
  int rc;

  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_argcheck(L, signum != 0, 1, "signal 0 cannot be handled");
  luaL_argcheck(L, signum != SIGKILL && signum != SIGSTOP, 1,
                "SIGKILL and SIGSTOP cannot be handled");

  /* The core ignores SIGPIPE so a write to a closed peer fails with EPIPE.
   * libuv restores the default action, which ends the process, when the
   * last handler of a signal stops, so a SIGPIPE handler is rejected. */
  luaL_argcheck(L, signum != SIGPIPE, 1,
                "SIGPIPE is ignored by the core "
                "and cannot be handled");

  sig = calloc(1, sizeof(*sig));
  if (sig == NULL) {
    return luaL_error(L, "out of memory");
  }

  uv_signal_init(jv__loop(), &sig->handle);
  sig->handle.data = sig;

  rc = uv_signal_start(&sig->handle, signal_cb, signum);
  if (rc != 0) {
    uv_close((uv_handle_t *) &sig->handle, signal_close_cb);
    return luaL_error(L, "cannot handle signal %d: %s", signum,
                      uv_strerror(rc));
  }

  /* A handler alone should not keep core.run() from returning: a daemon
   * has listeners for that, and a finished script should exit. */
  uv_unref((uv_handle_t *) &sig->handle);

  lua_pushvalue(L, 2);
  sig->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  box = lua_newuserdata(L, sizeof(*box));
  box->sig = sig;
  luaL_getmetatable(L, JV_SIGNAL_MT);
  lua_setmetatable(L, -2);
  return 1;
}


/* handle:stop(): removes the handler; safe to call twice. Dropping the last
 * reference does not stop a handler. */
static int
l_signal_stop(lua_State *L)
{
  jv_signal_box_t *box = luaL_checkudata(L, 1, JV_SIGNAL_MT);
  jv_signal_t *sig = box->sig;

  if (sig == NULL) {
    return 0;
  }

  box->sig = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, sig->fn_ref);
  sig->fn_ref = LUA_NOREF;
  uv_close((uv_handle_t *) &sig->handle, signal_close_cb);
  return 0;
}


/* core.signal.number(name): the number of a signal name, or nil. */
static int
l_signal_number(lua_State *L)
{
  int signum = jv__signal_number(luaL_checkstring(L, 1));

  if (signum == 0) {
    lua_pushnil(L);
    return 1;
  }

  lua_pushinteger(L, signum);
  return 1;
}


/* core.signal.name(number): "SIGTERM" for 15, or nil. */
static int
l_signal_name(lua_State *L)
{
  lua_pushstring(L, jv__signal_name((int) luaL_checkinteger(L, 1)));
  return 1;
}


/* Keeps the shared object holding this code mapped until the process
 * ends. Plain luajit unloads C modules in lua_close, and libuv with them,
 * but the signal handlers libuv installed stay: a SIGCHLD or a handled
 * signal arriving after that jumps to unmapped code. In the justavps
 * executable the core is linked in and this is a no-op. */
static void
pin_module(void)
{
  Dl_info info;

  if (dladdr((void *) pin_module, &info) != 0 && info.dli_fname != NULL) {
    /* The handle is dropped on purpose: RTLD_NODELETE does the work. */
    (void) dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  }
}


int
jv__open_signal(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "on", l_signal_on },
                                    { "number", l_signal_number },
                                    { "name", l_signal_name },
                                    { NULL, NULL } };
  static const luaL_Reg methods[] = { { "stop", l_signal_stop },
                                      { NULL, NULL } };

  pin_module();

  luaL_newmetatable(L, JV_SIGNAL_MT);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
