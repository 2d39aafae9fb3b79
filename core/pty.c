/*
 * pty.c: programs on a pseudo-terminal (core.pty).
 *
 * forkpty() makes the terminal and the child, which it puts in a new
 * session with the terminal's slave side as its controlling terminal. The
 * parent's master fd is made close-on-exec and wrapped in a stream (made
 * non-blocking there) and a Lua socket.
 *
 * uv_spawn cannot run a child on a terminal, so libuv does not reap these
 * children. One SIGCHLD watcher calls waitpid() with WNOHANG on each pid
 * this file started. It never calls waitpid(-1), which would also reap
 * uv_spawn's children and lose their status for libuv. libuv's handler in
 * turn waits only on the pids it spawned, which the spec that runs both
 * kinds of child together checks.
 */
#define _GNU_SOURCE /* pipe2 */

#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <pty.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define JV_PTY_MT "justavps.pty"


#define PTY_TERM "xterm-256color"

/* Socket methods that a pty object forwards to pty.io. */
static const char *const forwarded[] = { "read",   "readn",      "readuntil",
                                         "write",  "flush",      "close",
                                         "closed", "settimeout", "buffered",
                                         "queued", NULL };

typedef struct jv_pty_s jv_pty_t;

struct jv_pty_s {
  jv_pty_t *next; /* in reaper.children while the child runs */
  jv_exit_t *exit;
  void *box; /* NULL once the Lua object is collected */
  pid_t pid;
  int status; /* from waitpid() */
};

typedef struct {
  jv_pty_t *pty;
} jv_pty_box_t;

static struct {
  uv_signal_t sigchld;
  int started;
  jv_pty_t *children;
} reaper;

/* The step of the child's setup that failed, reported through a pipe. */
enum { STEP_SETGID = 1, STEP_SETUID, STEP_CHDIR, STEP_EXEC };

static const char *const step_names[] = { NULL, "setgid", "setuid", "chdir",
                                          "exec" };

typedef struct {
  int step;
  int error; /* errno */
} jv_child_error_t;

/* Everything the child needs, prepared before the fork: between fork and
 * exec the child may only make async-signal-safe calls, so no malloc. */
typedef struct {
  const char *file;
  char **argv;
  char **env;
  const char *cwd;
  int set_uid;
  int set_gid;
  uid_t uid;
  gid_t gid;
} jv_child_t;


static void
pty_free(jv_pty_t *t)
{
  jv__exit_free(t->exit);
  free(t);
}


static void
reaper_cb(uv_signal_t *handle, int signum)
{
  jv_pty_t **p = &reaper.children;
  jv_pty_t *done = NULL, *t;
  pid_t r;

  /* Take every exited child off the list first, then report them: a
   * resumed waiter may start or collect other ptys. */
  while ((t = *p) != NULL) {
    do {
      r = waitpid(t->pid, &t->status, WNOHANG);
    } while (r == -1 && errno == EINTR);

    if (r == 0) {
      p = &t->next;
      continue;
    }

    if (r == -1) {
      /* Only a waitpid(-1) elsewhere in the process can have reaped it. */
      jv_log(JV_LOG_ALERT,
             "pty child was reaped elsewhere; its exit "
             "status is lost",
             NULL);
      t->status = 255 << 8;
    }

    *p = t->next;
    t->next = done;
    done = t;
  }

  if (reaper.children == NULL) {
    uv_unref((uv_handle_t *) &reaper.sigchld);
  }

  while ((t = done) != NULL) {
    done = t->next;
    t->next = NULL;

    if (t->box == NULL) {
      pty_free(t);

    } else if (WIFSIGNALED(t->status)) {
      jv__exit_set(t->exit, 0, WTERMSIG(t->status));

    } else {
      jv__exit_set(t->exit, WEXITSTATUS(t->status), 0);
    }
  }
}


/* Starts the SIGCHLD watcher. It must run before the first fork, or a
 * child that exits at once would go unnoticed. */
static int
reaper_start(void)
{
  int rc;

  if (reaper.started) {
    return 0;
  }

  uv_signal_init(jv__loop(), &reaper.sigchld);
  rc = uv_signal_start(&reaper.sigchld, reaper_cb, SIGCHLD);
  if (rc != 0) {
    uv_close((uv_handle_t *) &reaper.sigchld, NULL);
    return rc;
  }

  uv_unref((uv_handle_t *) &reaper.sigchld);
  reaper.started = 1;
  return 0;
}


static void
reaper_track(jv_pty_t *t)
{
  t->next = reaper.children;
  reaper.children = t;

  /* A running child keeps the loop alive, as a uv_process_t does. */
  uv_ref((uv_handle_t *) &reaper.sigchld);
}


/* Reports a failed step to the parent and exits as a shell does when it
 * cannot run a command. */
static void
child_fail(int fd, int step)
{
  jv_child_error_t e;
  ssize_t n;

  e.step = step;
  e.error = errno;

  do {
    n = write(fd, &e, sizeof(e));
  } while (n == -1 && errno == EINTR);

  _exit(127);
}


/* Runs in the forked child, on the terminal forkpty() set up. */
static void
child_exec(const jv_child_t *c, int err_fd)
{
  extern char **environ;
  struct sigaction sa;
  sigset_t none;
  int i;

  /* Exec keeps ignored signals ignored, and we ignore SIGPIPE; libuv's
   * handlers must not run in the child either. Reset them all, then
   * unblock what the parent blocked around the fork. */
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = SIG_DFL;
  for (i = 1; i < NSIG; i++) {
    sigaction(i, &sa, NULL);
  }

  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, NULL);

  if (c->set_uid || c->set_gid) {
    /* Drop supplementary groups; this fails without privilege, in which
     * case setgid or setuid report the real problem. */
    (void) setgroups(0, NULL);
  }

  if (c->set_gid && setgid(c->gid) != 0) {
    child_fail(err_fd, STEP_SETGID);
  }

  if (c->set_uid && setuid(c->uid) != 0) {
    child_fail(err_fd, STEP_SETUID);
  }

  if (c->cwd != NULL && chdir(c->cwd) != 0) {
    child_fail(err_fd, STEP_CHDIR);
  }

  if (c->env != NULL) {
    environ = c->env;
  }

  execvp(c->file, c->argv);
  child_fail(err_fd, STEP_EXEC);
}


/* Forks the child on a new terminal. Returns its pid and the master fd in
 * *master, or a negative error code with the failed step in *step. */
static pid_t
pty_fork(const jv_child_t *c, struct winsize *ws, int *master, int *step)
{
  jv_child_error_t report;
  sigset_t all, saved;
  int fds[2], err;
  ssize_t n;
  pid_t pid, r;

  *step = 0;

  /* The child's report pipe. A successful exec closes it, so end of file
   * on the read end means the program runs. */
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return -errno;
  }

  /* Block signals so no handler runs in the child before it resets
   * them. */
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &saved);

  pid = forkpty(master, NULL, NULL, ws);
  if (pid == 0) {
    close(fds[0]);
    child_exec(c, fds[1]);
  }

  err = errno;
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  close(fds[1]);

  if (pid < 0) {
    close(fds[0]);
    return -err;
  }

  do {
    n = read(fds[0], &report, sizeof(report));
  } while (n == -1 && errno == EINTR);

  close(fds[0]);

  if (n == (ssize_t) sizeof(report)) {
    /* The child has exited or is about to: reap it here. */
    do {
      r = waitpid(pid, NULL, 0);
    } while (r == -1 && errno == EINTR);

    close(*master);
    *step = report.step;
    return -report.error;
  }

  /* The master must not leak into other children, uv_spawn's included. */
  fcntl(*master, F_SETFD, FD_CLOEXEC);
  return pid;
}


static int
opt_size(lua_State *L, const char *name, int def)
{
  lua_Integer n;

  lua_getfield(L, 1, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return def;
  }

  n = lua_tointeger(L, -1);
  if (lua_type(L, -1) != LUA_TNUMBER || n < 1 || n > 65535) {
    luaL_error(L, "%s must be an integer from 1 to 65535", name);
  }

  lua_pop(L, 1);
  return (int) n;
}


static int
opt_id(lua_State *L, const char *name, int *out)
{
  int present;

  lua_getfield(L, 1, name);
  present = !lua_isnil(L, -1);
  if (present) {
    if (lua_type(L, -1) != LUA_TNUMBER || lua_tointeger(L, -1) < 0) {
      luaL_error(L, "%s must be a non-negative integer", name);
    }
    *out = (int) lua_tointeger(L, -1);
  }

  lua_pop(L, 1);
  return present;
}


/* core.pty.spawn{file=, args=, env=, cwd=, cols=, rows=, uid=, gid=,
 * login=}: see docs/api/pty.md. */
static int
l_pty_spawn(lua_State *L)
{
  const char *argv0 = NULL, *base;
  struct winsize ws;
  jv_pty_box_t *box;
  jv_stream_t *s;
  jv_child_t c;
  jv_pty_t *t;
  int master, step, id, err;
  pid_t pid;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  memset(&c, 0, sizeof(c));
  memset(&ws, 0, sizeof(ws));

  lua_getfield(L, 1, "file");
  c.file = lua_tostring(L, -1);
  if (lua_type(L, -1) != LUA_TSTRING || *c.file == '\0') {
    return luaL_argerror(L, 1, "file must be a non-empty string");
  }

  lua_getfield(L, 1, "cwd");
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING) {
    return luaL_argerror(L, 1, "cwd must be a string");
  }
  c.cwd = lua_tostring(L, -1);

  ws.ws_col = (unsigned short) opt_size(L, "cols", 80);
  ws.ws_row = (unsigned short) opt_size(L, "rows", 24);

  if (opt_id(L, "uid", &id)) {
    c.set_uid = 1;
    c.uid = (uid_t) id;
  }

  if (opt_id(L, "gid", &id)) {
    c.set_gid = 1;
    c.gid = (gid_t) id;
  }

  lua_getfield(L, 1, "login");
  if (lua_toboolean(L, -1)) {
    /* A leading dash in argv[0] makes a shell act as a login shell, the
     * convention login(1) uses. */
    base = strrchr(c.file, '/');
    argv0 = lua_pushfstring(L, "-%s", base != NULL ? base + 1 : c.file);
  }

  c.argv = jv__build_argv(L, 1, c.file, argv0);
  c.env = jv__build_env(L, 1, PTY_TERM);

  err = reaper_start();
  if (err != 0) {
    return jv__push_error_msg(L, err,
                              "cannot watch SIGCHLD for the pty "
                              "child");
  }

  t = calloc(1, sizeof(*t));
  if (t == NULL) {
    return luaL_error(L, "out of memory");
  }

  t->exit = jv__exit_new();
  if (t->exit == NULL) {
    free(t);
    return luaL_error(L, "out of memory");
  }

  pid = pty_fork(&c, &ws, &master, &step);
  if (pid < 0) {
    pty_free(t);
    lua_pushnil(L);
    if (step != 0) {
      lua_pushfstring(L, "cannot spawn '%s' on a pty: %s failed: %s", c.file,
                      step_names[step], jv_strerror(pid));

    } else {
      lua_pushfstring(L, "cannot open a pty for '%s': %s", c.file,
                      jv_strerror(pid));
    }
    lua_pushstring(L, jv_err_name(pid));
    return 3;
  }

  t->pid = pid;
  reaper_track(t);

  s = jv_stream_new_fd(master, &err);
  if (s == NULL) {
    /* The reaper collects the child once it dies, and frees t. */
    close(master);
    kill(pid, SIGKILL);
    return jv__push_error_msg(L, err, "cannot watch the pty master");
  }

  box = lua_newuserdata(L, sizeof(*box));
  box->pty = t;
  t->box = box;
  luaL_getmetatable(L, JV_PTY_MT);
  lua_setmetatable(L, -2);

  lua_createtable(L, 0, 1);
  jv__sock_push(L, s);
  lua_setfield(L, -2, "io");
  lua_setfenv(L, -2);
  return 1;
}


static jv_pty_t *
check_pty(lua_State *L)
{
  return ((jv_pty_box_t *) luaL_checkudata(L, 1, JV_PTY_MT))->pty;
}


/* Returns the master fd of the pty at index 1, or -1 once pty.io is
 * closed. */
static int
pty_master_fd(lua_State *L)
{
  jv_stream_t *s;
  uv_os_fd_t fd;

  lua_getfenv(L, 1);
  lua_getfield(L, -1, "io");
  s = jv__sock_stream(jv__sock_check(L, -1, 1));
  lua_pop(L, 2);

  if (s == NULL || jv_stream_is_closing(s) ||
      uv_fileno(&s->uv.handle, &fd) != 0) {
    return -1;
  }

  return fd;
}


static int
l_pty_pid(lua_State *L)
{
  lua_pushinteger(L, check_pty(L)->pid);
  return 1;
}


static int
l_pty_exited(lua_State *L)
{
  lua_pushboolean(L, jv__exit_done(check_pty(L)->exit));
  return 1;
}


/* pty:wait([timeout]): status, signal name, as proc:wait. */
static int
l_pty_wait(lua_State *L)
{
  jv_pty_t *t = check_pty(L);

  return jv__exit_wait(L, t->exit, 2);
}


/* pty:kill([signal]): sends signal (default SIGHUP) to the child's process
 * group and to the terminal's foreground group when that is another one,
 * so a job a shell runs in its own group gets it too. */
static int
l_pty_kill(lua_State *L)
{
  jv_pty_t *t = check_pty(L);
  int signum = lua_isnoneornil(L, 2) ? SIGHUP : jv__check_signal(L, 2);
  int fd, rc, rc_fg;
  pid_t fg;

  /* The child leads its session and group, and the kernel reuses no id
   * while a group of that id lives, so this is safe after the child
   * exits too. */
  rc = uv_kill(-t->pid, signum);

  fd = pty_master_fd(L);
  fg = fd >= 0 ? tcgetpgrp(fd) : -1;
  if (fg > 0 && fg != t->pid) {
    rc_fg = uv_kill(-fg, signum);
    if (rc != 0) {
      rc = rc_fg;
    }
  }

  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  return 1;
}


/* pty:resize(cols, rows): sets the window size; the kernel sends SIGWINCH
 * to the foreground group. */
static int
l_pty_resize(lua_State *L)
{
  lua_Integer cols = luaL_checkinteger(L, 2);
  lua_Integer rows = luaL_checkinteger(L, 3);
  struct winsize ws;
  int fd;

  check_pty(L);
  luaL_argcheck(L, cols >= 1 && cols <= 65535, 2, "must be 1 to 65535");
  luaL_argcheck(L, rows >= 1 && rows <= 65535, 3, "must be 1 to 65535");

  fd = pty_master_fd(L);
  if (fd < 0) {
    return jv__push_error(L, JV_ECLOSED);
  }

  memset(&ws, 0, sizeof(ws));
  ws.ws_col = (unsigned short) cols;
  ws.ws_row = (unsigned short) rows;

  if (ioctl(fd, TIOCSWINSZ, &ws) != 0) {
    return jv__push_error(L, -errno);
  }

  lua_pushboolean(L, 1);
  return 1;
}


/* __index: methods first, then io from the environment table. */
static int
l_pty_index(lua_State *L)
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
l_pty_gc(lua_State *L)
{
  jv_pty_box_t *box = luaL_checkudata(L, 1, JV_PTY_MT);
  jv_pty_t *t = box->pty;

  if (t == NULL) {
    return 0;
  }

  box->pty = NULL;
  t->box = NULL;

  /* A running child stays on the reaper's list, which frees it once it
   * exits. */
  if (jv__exit_done(t->exit)) {
    pty_free(t);
  }

  return 0;
}


static int
l_pty_tostring(lua_State *L)
{
  jv_pty_t *t = check_pty(L);

  lua_pushfstring(L, "justavps.pty (pid %d%s)", (int) t->pid,
                  jv__exit_done(t->exit) ? ", exited" : "");
  return 1;
}


/* Adds to the method table at the top of the stack one Lua function per
 * forwarded socket method. They are Lua functions, not C, so a read that
 * waits can yield through them. */
static void
add_forwarders(lua_State *L)
{
  static const char chunk[] = "local methods, names = ...\n"
                              "for i = 1, #names do\n"
                              "  local name = names[i]\n"
                              "  methods[name] = function(self, ...)\n"
                              "    local io = self.io\n"
                              "    return io[name](io, ...)\n"
                              "  end\n"
                              "end\n";
  int i;

  if (luaL_loadbuffer(L, chunk, sizeof(chunk) - 1, "=pty forwarders") != 0) {
    lua_error(L);
  }

  lua_pushvalue(L, -2);
  lua_newtable(L);
  for (i = 0; forwarded[i] != NULL; i++) {
    lua_pushstring(L, forwarded[i]);
    lua_rawseti(L, -2, i + 1);
  }

  lua_call(L, 2, 0);
}


int
jv__open_pty(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "spawn", l_pty_spawn }, { NULL, NULL } };
  static const luaL_Reg methods[] = {
    { "pid", l_pty_pid },       { "wait", l_pty_wait },
    { "kill", l_pty_kill },     { "resize", l_pty_resize },
    { "exited", l_pty_exited }, { NULL, NULL }
  };

  luaL_newmetatable(L, JV_PTY_MT);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  add_forwarders(L);
  lua_pushcclosure(L, l_pty_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_pty_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_pty_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
