/*
 * proc.c: child processes through uv_spawn (core.proc).
 *
 * Each pipe to a child is a pipe2() pair made here with O_CLOEXEC. The
 * child's end goes to uv_spawn as UV_INHERIT_FD and the parent's end
 * becomes a Lua socket (jv_stream_new_fd), so proc.stdout:read() and
 * proc.stdin:write() behave like any socket. libuv reaps each child from
 * its SIGCHLD handler with waitpid() on that child's pid, so a child leaves
 * no zombie as long as the loop runs.
 *
 * This file also contains what pty.c shares with it: the exit status with its
 * parked waiters, and the argv and environment builders.
 */
#define _GNU_SOURCE /* pipe2 */

#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define JV_PROC_MT "justavps.proc"


/*
 * Exit status and the coroutines waiting for it. A waiter with a timeout
 * owns a timer; the waiter is freed from that timer's close callback.
 */
typedef struct jv_exit_waiter_s jv_exit_waiter_t;

struct jv_exit_waiter_s {
  jv_exit_waiter_t *next;
  jv_exit_t *exit;
  uv_timer_t timer;
  int ref;
  int timed;
};

struct jv_exit_s {
  jv_exit_waiter_t *waiters;
  int done;
  int status; /* exit status, or 128 + signal number */
  int signum; /* terminating signal, or 0 */
};


jv_exit_t *
jv__exit_new(void)
{
  return calloc(1, sizeof(jv_exit_t));
}


static void
waiter_close_cb(uv_handle_t *handle)
{
  free(handle->data);
}


static void
waiter_release(jv_exit_waiter_t *w)
{
  if (w->timed) {
    uv_close((uv_handle_t *) &w->timer, waiter_close_cb);

  } else {
    free(w);
  }
}


/* Frees the status. A parked waiter keeps the owning object on its stack,
 * so waiters are left here only when the owner is freed by force. */
void
jv__exit_free(jv_exit_t *x)
{
  jv_exit_waiter_t *w;

  if (x == NULL) {
    return;
  }

  while ((w = x->waiters) != NULL) {
    x->waiters = w->next;
    jv__co_forget(w->ref);
    waiter_release(w);
  }

  free(x);
}


int
jv__exit_done(const jv_exit_t *x)
{
  return x->done;
}


static int
exit_push(lua_State *L, const jv_exit_t *x)
{
  lua_pushinteger(L, x->status);

  if (x->signum != 0) {
    lua_pushstring(L, jv__signal_name(x->signum));

  } else {
    lua_pushnil(L);
  }

  return 2;
}


/* Records how the child ended and resumes every waiter. status is the exit
 * status when signum is 0; a child killed by a signal reports 128 + signum,
 * as a shell does. */
void
jv__exit_set(jv_exit_t *x, int status, int signum)
{
  jv_exit_waiter_t *list, *w;
  lua_State *co;

  x->done = 1;
  x->signum = signum;
  x->status = signum != 0 ? 128 + signum : status;

  /* A resumed waiter may call wait again, which now returns at once. Take
   * the list first so that call cannot change it under the loop below. */
  list = x->waiters;
  x->waiters = NULL;

  while ((w = list) != NULL) {
    list = w->next;
    co = jv__co_thread(w->ref);
    exit_push(co, x);
    if (w->timed) {
      uv_timer_stop(&w->timer);
    }
    jv__co_resume(w->ref, 2);
    waiter_release(w);
  }
}


static void
waiter_timeout_cb(uv_timer_t *timer)
{
  jv_exit_waiter_t *w = timer->data;
  jv_exit_waiter_t **p;
  lua_State *co;
  int ref = w->ref;

  for (p = &w->exit->waiters; *p != NULL; p = &(*p)->next) {
    if (*p == w) {
      *p = w->next;
      break;
    }
  }

  waiter_release(w);
  co = jv__co_thread(ref);
  jv__push_error_msg(co, JV_ETIMEOUT,
                     "timed out waiting for the process "
                     "to exit");
  jv__co_resume(ref, 3);
}


/* Returns status and signal name at once when the child has exited.
 * Otherwise parks the calling coroutine until it exits or until the timeout
 * passes. The timeout is in seconds at stack index timeout_idx, nil for
 * none. */
int
jv__exit_wait(lua_State *L, jv_exit_t *x, int timeout_idx)
{
  double timeout = luaL_optnumber(L, timeout_idx, -1);
  jv_exit_waiter_t *w;

  luaL_argcheck(L, lua_isnoneornil(L, timeout_idx) || timeout >= 0, timeout_idx,
                "must be >= 0");

  if (x->done) {
    return exit_push(L, x);
  }

  if (!jv__co_parkable(L)) {
    return luaL_error(L, "wait() must run in a coroutine started by "
                         "core.spawn or a core callback");
  }

  w = calloc(1, sizeof(*w));
  if (w == NULL) {
    return luaL_error(L, "out of memory");
  }

  w->exit = x;
  w->ref = jv__co_park(L);

  if (timeout >= 0) {
    w->timed = 1;
    uv_timer_init(jv__loop(), &w->timer);
    w->timer.data = w;
    uv_timer_start(&w->timer, waiter_timeout_cb, (uint64_t) (timeout * 1000),
                   0);
  }

  w->next = x->waiters;
  x->waiters = w;
  return lua_yield(L, 0);
}


/*
 * Argument and environment arrays for exec. Both push one table that
 * anchors the strings and keeps the NULL-terminated pointer array as a
 * userdata, so a Lua error raised while building them leaks nothing.
 */
static char **
list_new(lua_State *L, size_t n)
{
  char **list;

  lua_newtable(L);
  list = lua_newuserdata(L, (n + 1) * sizeof(char *));
  memset(list, 0, (n + 1) * sizeof(char *));
  lua_setfield(L, -2, "list");
  return list;
}


/* Pops the string on top of the stack into the anchor table at index
 * anchor and returns a pointer to it. */
static char *
list_keep(lua_State *L, int anchor, int slot)
{
  char *s = (char *) lua_tostring(L, -1);

  lua_rawseti(L, anchor, slot);
  return s;
}


/* argv is argv0 (file when NULL), then opts.args, which must be an array of
 * strings or numbers. */
char **
jv__build_argv(lua_State *L, int opts, const char *file, const char *argv0)
{
  size_t n = 0, i;
  char **argv;
  int args, anchor;

  lua_getfield(L, opts, "args");
  args = lua_gettop(L);

  if (!lua_isnil(L, args)) {
    if (!lua_istable(L, args)) {
      luaL_error(L, "args must be an array of strings");
    }
    n = lua_objlen(L, args);
  }

  argv = list_new(L, n + 1);
  anchor = lua_gettop(L);

  lua_pushstring(L, argv0 != NULL ? argv0 : file);
  argv[0] = list_keep(L, anchor, 1);

  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, args, (int) i);
    if (!lua_isstring(L, -1)) {
      luaL_error(L, "args[%d] must be a string", (int) i);
    }
    argv[i] = list_keep(L, anchor, (int) i + 1);
  }

  lua_remove(L, args);
  return argv;
}


/* Builds "K=V" strings from opts.env, which replaces the environment. With
 * opts.env nil, returns NULL (inherit) unless term is set; then the
 * inherited environment is copied. A term (for a PTY) sets TERM unless
 * opts.env names one. */
char **
jv__build_env(lua_State *L, int opts, const char *term)
{
  extern char **environ;
  size_t n = 0, slot = 0;
  int env, anchor, has_term = 0;
  char **list;

  lua_getfield(L, opts, "env");
  env = lua_gettop(L);

  if (lua_isnil(L, env)) {
    lua_pop(L, 1);

    if (term == NULL) {
      lua_pushnil(L);
      return NULL;
    }

    while (environ[n] != NULL) {
      n++;
    }

    list = list_new(L, n + 1);
    anchor = lua_gettop(L);

    for (n = 0; environ[n] != NULL; n++) {
      /* The terminal is ours, so an inherited TERM describes another. */
      if (strncmp(environ[n], "TERM=", 5) == 0) {
        continue;
      }
      lua_pushstring(L, environ[n]);
      list[slot] = list_keep(L, anchor, (int) slot + 1);
      slot++;
    }

    lua_pushfstring(L, "TERM=%s", term);
    list[slot] = list_keep(L, anchor, (int) slot + 1);
    return list;
  }

  if (!lua_istable(L, env)) {
    luaL_error(L, "env must be a table of NAME = value");
  }

  lua_pushnil(L);
  while (lua_next(L, env) != 0) {
    n++;
    lua_pop(L, 1);
  }

  list = list_new(L, n + 1);
  anchor = lua_gettop(L);

  lua_pushnil(L);
  while (lua_next(L, env) != 0) {
    const char *key, *value;

    if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1)) {
      luaL_error(L, "env must map string names to strings");
    }

    key = lua_tostring(L, -2);
    if (*key == '\0' || strchr(key, '=') != NULL) {
      luaL_error(L, "env name '%s' is empty or contains '='", key);
    }

    /* Converting a number value in place is safe during lua_next; only
     * the key must not change. */
    value = lua_tostring(L, -1);
    if (strcmp(key, "TERM") == 0) {
      has_term = 1;
    }

    lua_pushfstring(L, "%s=%s", key, value);
    list[slot] = list_keep(L, anchor, (int) slot + 1);
    slot++;
    lua_pop(L, 1);
  }

  if (term != NULL && !has_term) {
    lua_pushfstring(L, "TERM=%s", term);
    list[slot] = list_keep(L, anchor, (int) slot + 1);
  }

  lua_remove(L, env);
  return list;
}


/*
 * Processes.
 */
typedef struct jv_proc_box_s jv_proc_box_t;

typedef struct {
  uv_process_t handle;
  jv_exit_t *exit;
  jv_proc_box_t *box; /* NULL once the Lua object is collected */
  int pid;
  unsigned detached : 1;
  unsigned closed : 1; /* the handle's close callback has run */
} jv_proc_t;

struct jv_proc_box_s {
  jv_proc_t *proc;
};

enum { STDIO_NULL, STDIO_PIPE, STDIO_INHERIT, STDIO_STDOUT };

static const char *const stdio_modes[] = { "null", "pipe", "inherit", "stdout",
                                           NULL };

static const char *const stdio_names[] = { "stdin", "stdout", "stderr" };


static void
proc_free(jv_proc_t *p)
{
  jv__exit_free(p->exit);
  free(p);
}


static void
proc_close_cb(uv_handle_t *handle)
{
  jv_proc_t *p = handle->data;

  p->closed = 1;

  if (p->box == NULL) {
    proc_free(p);
  }
}


static void
proc_exit_cb(uv_process_t *handle, int64_t status, int signum)
{
  jv_proc_t *p = handle->data;

  /* libuv has reaped the child; the handle has no more work. */
  uv_close((uv_handle_t *) handle, proc_close_cb);
  jv__exit_set(p->exit, (int) status, signum);
}


/* The parent's and the child's end of one standard stream. */
typedef struct {
  int mode;
  int child_fd;        /* what the child gets, or -1 */
  jv_stream_t *stream; /* the parent's end of a pipe */
} jv_stdio_t;


static void
stdio_cleanup(jv_stdio_t *io, int close_streams)
{
  int i;

  for (i = 0; i < 3; i++) {
    /* Inherited fds and the shared stdout are not ours to close. */
    if (io[i].child_fd >= 0 &&
        (io[i].mode == STDIO_NULL || io[i].mode == STDIO_PIPE)) {
      close(io[i].child_fd);
    }
    io[i].child_fd = -1;

    if (close_streams && io[i].stream != NULL) {
      jv_stream_close(io[i].stream, NULL);
      io[i].stream = NULL;
    }
  }
}


/* Opens the fd that io[i].mode names. Returns 0 or an error code. */
static int
stdio_open(jv_stdio_t *io, int i)
{
  int fds[2], err, parent, child;

  switch (io[i].mode) {
  case STDIO_INHERIT:
    io[i].child_fd = i;
    return 0;

  case STDIO_STDOUT:
    io[i].child_fd = io[1].child_fd;
    return 0;

  case STDIO_NULL:
    io[i].child_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    return io[i].child_fd < 0 ? -errno : 0;

  default:
    break;
  }

  if (pipe2(fds, O_CLOEXEC) != 0) {
    return -errno;
  }

  /* The child reads its stdin from the read end and writes the others. */
  parent = i == 0 ? fds[1] : fds[0];
  child = i == 0 ? fds[0] : fds[1];

  io[i].stream = jv_stream_new_fd(parent, &err);
  if (io[i].stream == NULL) {
    close(parent);
    close(child);
    return err;
  }

  io[i].child_fd = child;
  return 0;
}


/* Returns the mode named by opts[name] (default "null"), raising when the
 * value is not one of stdio_modes. */
static int
check_stdio_mode(lua_State *L, const char *name)
{
  const char *mode;
  int i;

  lua_getfield(L, 1, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return STDIO_NULL;
  }

  mode = lua_tostring(L, -1);
  for (i = 0; mode != NULL && stdio_modes[i] != NULL; i++) {
    if (strcmp(mode, stdio_modes[i]) == 0) {
      lua_pop(L, 1);
      return i;
    }
  }

  return luaL_error(
      L, "%s must be \"pipe\", \"null\" or \"inherit\"%s", name,
      strcmp(name, "stderr") == 0 ? " or \"stdout\" (merge into stdout)" : "");
}


static int
push_spawn_error(lua_State *L, const char *file, int code)
{
  lua_pushnil(L);
  lua_pushfstring(L, "cannot spawn '%s': %s", file, jv_strerror(code));
  lua_pushstring(L, jv_err_name(code));
  return 3;
}


static int
opt_integer(lua_State *L, int opts, const char *name, int *out)
{
  int present;

  lua_getfield(L, opts, name);
  present = !lua_isnil(L, -1);
  if (present) {
    if (lua_type(L, -1) != LUA_TNUMBER) {
      luaL_error(L, "%s must be an integer", name);
    }
    *out = (int) lua_tointeger(L, -1);
  }
  lua_pop(L, 1);
  return present;
}


/* core.proc.spawn{file=, args=, env=, cwd=, stdin=, stdout=, stderr=,
 * detached=, uid=, gid=}: see docs/api/proc.md. */
static int
l_proc_spawn(lua_State *L)
{
  uv_process_options_t opts;
  uv_stdio_container_t containers[3];
  jv_stdio_t io[3];
  jv_proc_box_t *box;
  const char *file, *cwd;
  char **argv, **env;
  jv_proc_t *p;
  int i, rc, uid, gid;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);

  lua_getfield(L, 1, "file");
  file = lua_tostring(L, -1);
  if (lua_type(L, -1) != LUA_TSTRING || *file == '\0') {
    return luaL_argerror(L, 1, "file must be a non-empty string");
  }

  lua_getfield(L, 1, "cwd");
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING) {
    return luaL_argerror(L, 1, "cwd must be a string");
  }
  cwd = lua_tostring(L, -1);

  argv = jv__build_argv(L, 1, file, NULL);
  env = jv__build_env(L, 1, NULL);

  memset(&opts, 0, sizeof(opts));
  opts.file = file;
  opts.args = argv;
  opts.env = env;
  opts.cwd = cwd;
  opts.exit_cb = proc_exit_cb;

  if (opt_integer(L, 1, "uid", &uid)) {
    opts.flags |= UV_PROCESS_SETUID;
    opts.uid = (uv_uid_t) uid;
  }

  if (opt_integer(L, 1, "gid", &gid)) {
    opts.flags |= UV_PROCESS_SETGID;
    opts.gid = (uv_gid_t) gid;
  }

  lua_getfield(L, 1, "detached");
  if (lua_toboolean(L, -1)) {
    opts.flags |= UV_PROCESS_DETACHED;
  }
  lua_pop(L, 1);

  for (i = 0; i < 3; i++) {
    io[i].mode = check_stdio_mode(L, stdio_names[i]);
    io[i].child_fd = -1;
    io[i].stream = NULL;
  }

  if (io[0].mode == STDIO_STDOUT || io[1].mode == STDIO_STDOUT) {
    return luaL_argerror(L, 1, "only stderr may be \"stdout\"");
  }

  p = calloc(1, sizeof(*p));
  if (p == NULL) {
    return luaL_error(L, "out of memory");
  }

  p->exit = jv__exit_new();
  if (p->exit == NULL) {
    free(p);
    return luaL_error(L, "out of memory");
  }

  for (i = 0; i < 3; i++) {
    rc = stdio_open(io, i);
    if (rc != 0) {
      stdio_cleanup(io, 1);
      proc_free(p);
      return push_spawn_error(L, file, rc);
    }

    containers[i].flags = UV_INHERIT_FD;
    containers[i].data.fd = io[i].child_fd;
  }

  opts.stdio = containers;
  opts.stdio_count = 3;
  p->handle.data = p;

  rc = uv_spawn(jv__loop(), &p->handle, &opts);
  if (rc != 0) {
    stdio_cleanup(io, 1);
    /* uv_spawn initialised the handle, so it must go through uv_close;
     * the close callback frees p because no box owns it. */
    uv_close((uv_handle_t *) &p->handle, proc_close_cb);
    return push_spawn_error(L, file, rc);
  }

  /* The child has its copies now. */
  stdio_cleanup(io, 0);

  p->pid = p->handle.pid;
  p->detached = (opts.flags & UV_PROCESS_DETACHED) != 0;

  box = lua_newuserdata(L, sizeof(*box));
  box->proc = p;
  p->box = box;
  luaL_getmetatable(L, JV_PROC_MT);
  lua_setmetatable(L, -2);

  /* The pipes live in the object's environment table, where __index
   * finds them as proc.stdin, proc.stdout and proc.stderr. */
  lua_createtable(L, 0, 3);
  for (i = 0; i < 3; i++) {
    if (io[i].stream != NULL) {
      jv__sock_push(L, io[i].stream);
      lua_setfield(L, -2, stdio_names[i]);
    }
  }
  lua_setfenv(L, -2);
  return 1;
}


static jv_proc_t *
check_proc(lua_State *L)
{
  jv_proc_box_t *box = luaL_checkudata(L, 1, JV_PROC_MT);

  return box->proc;
}


static int
l_proc_pid(lua_State *L)
{
  lua_pushinteger(L, check_proc(L)->pid);
  return 1;
}


static int
l_proc_exited(lua_State *L)
{
  lua_pushboolean(L, jv__exit_done(check_proc(L)->exit));
  return 1;
}


/* proc:wait([timeout]): status, signal name; see jv__exit_wait. */
static int
l_proc_wait(lua_State *L)
{
  jv_proc_t *p = check_proc(L);

  return jv__exit_wait(L, p->exit, 2);
}


/* proc:kill([signal [, group]]): sends signal (default SIGTERM) to the
 * child, or with group to its whole process group, which needs detached. */
static int
l_proc_kill(lua_State *L)
{
  jv_proc_t *p = check_proc(L);
  int signum = lua_isnoneornil(L, 2) ? SIGTERM : jv__check_signal(L, 2);
  int group = lua_toboolean(L, 3);
  int rc;

  if (group && !p->detached) {
    return luaL_error(L, "a group kill needs a process spawned with "
                         "detached = true, or it would signal our own group");
  }

  /* The pid may belong to another process once the child is reaped. The
   * group id stays reserved while any member lives, so a group kill is
   * still safe and reaches what the child left behind. */
  if (!group && jv__exit_done(p->exit)) {
    return jv__push_error_msg(L, UV_ESRCH, "process has already exited");
  }

  rc = uv_kill(group ? -p->pid : p->pid, signum);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  return 1;
}


/* __index: methods first, then the pipes in the environment table. */
static int
l_proc_index(lua_State *L)
{
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  if (!lua_isnil(L, -1)) {
    return 1;
  }

  lua_getfenv(L, 1);
  lua_pushvalue(L, 2);
  lua_rawget(L, -2);
  return 1;
}


static int
l_proc_gc(lua_State *L)
{
  jv_proc_box_t *box = luaL_checkudata(L, 1, JV_PROC_MT);
  jv_proc_t *p = box->proc;

  if (p == NULL) {
    return 0;
  }

  box->proc = NULL;
  p->box = NULL;

  if (p->closed) {
    proc_free(p);
    return 0;
  }

  /* The child runs on. Keep the handle so libuv still reaps it, but let
   * the loop end without it. */
  if (!uv_is_closing((uv_handle_t *) &p->handle)) {
    uv_unref((uv_handle_t *) &p->handle);
  }

  return 0;
}


static int
l_proc_tostring(lua_State *L)
{
  jv_proc_t *p = check_proc(L);

  lua_pushfstring(L, "justavps.proc (pid %d%s)", p->pid,
                  jv__exit_done(p->exit) ? ", exited" : "");
  return 1;
}


/* core.proc.getpid(): this process's id. */
static int
l_getpid(lua_State *L)
{
  lua_pushinteger(L, uv_os_getpid());
  return 1;
}


/* core.proc.kill(pid, [signal]): kill(2) by pid; signal 0 checks whether
 * the process exists. A negative pid names a process group. */
static int
l_kill(lua_State *L)
{
  lua_Integer pid = luaL_checkinteger(L, 1);
  int signum = lua_isnoneornil(L, 2) ? SIGTERM : jv__check_signal(L, 2);
  int rc;

  luaL_argcheck(L, pid != 0 && pid != -1, 1,
                "0 and -1 would signal our own group or every process");

  rc = uv_kill((int) pid, signum);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  return 1;
}


int
jv__open_proc(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "spawn", l_proc_spawn },
                                    { "getpid", l_getpid },
                                    { "kill", l_kill },
                                    { NULL, NULL } };
  static const luaL_Reg methods[] = { { "pid", l_proc_pid },
                                      { "wait", l_proc_wait },
                                      { "kill", l_proc_kill },
                                      { "exited", l_proc_exited },
                                      { NULL, NULL } };

  luaL_newmetatable(L, JV_PROC_MT);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_pushcclosure(L, l_proc_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_proc_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_proc_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
