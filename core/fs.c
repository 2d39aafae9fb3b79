/*
 * fs.c: file system calls on the event loop (core.fs).
 *
 * fs.watch wraps uv_fs_event_t, which is inotify on Linux. fs.stat and
 * fs.rename run on libuv's thread pool while the calling coroutine is
 * parked, so a slow disk does not block the loop.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define JV_WATCH_MT "justavps.fs.watch"

typedef struct {
  uv_fs_event_t handle;
  int fn_ref;
} jv_watch_t;

typedef struct {
  jv_watch_t *watch; /* NULL once stopped */
} jv_watch_box_t;


static void
watch_close_cb(uv_handle_t *handle)
{
  free(handle->data);
}


static void
watch_cb(uv_fs_event_t *handle, const char *filename, int events, int status)
{
  jv_watch_t *w = handle->data;
  lua_State *L = jv__lua();

  lua_rawgeti(L, LUA_REGISTRYINDEX, w->fn_ref);

  if (status < 0) {
    lua_pushnil(L);
    lua_createtable(L, 0, 2);
    lua_pushstring(L, jv_err_name(status));
    lua_setfield(L, -2, "error");
    lua_pushstring(L, jv_strerror(status));
    lua_setfield(L, -2, "message");
    jv__co_start(L, 2, "fs.watch");
    return;
  }

  if (filename != NULL) {
    lua_pushstring(L, filename);

  } else {
    lua_pushnil(L);
  }

  lua_createtable(L, 0, 2);
  lua_pushboolean(L, (events & UV_CHANGE) != 0);
  lua_setfield(L, -2, "change");
  lua_pushboolean(L, (events & UV_RENAME) != 0);
  lua_setfield(L, -2, "rename");
  jv__co_start(L, 2, "fs.watch");
}


/* core.fs.watch(path, fn): runs fn(filename, events) in a new coroutine
 * for each change libuv reports. Returns a handle with stop(), or nil,
 * message, code when path cannot be watched. */
static int
l_fs_watch(lua_State *L)
{
  const char *path = luaL_checkstring(L, 1);
  jv_watch_box_t *box;
  jv_watch_t *w;
  int rc;

  luaL_checktype(L, 2, LUA_TFUNCTION);

  w = calloc(1, sizeof(*w));
  if (w == NULL) {
    return luaL_error(L, "out of memory");
  }

  uv_fs_event_init(jv__loop(), &w->handle);
  w->handle.data = w;
  w->fn_ref = LUA_NOREF;

  rc = uv_fs_event_start(&w->handle, watch_cb, path, 0);
  if (rc != 0) {
    uv_close((uv_handle_t *) &w->handle, watch_close_cb);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot watch '%s': %s", path, jv_strerror(rc));
    lua_pushstring(L, jv_err_name(rc));
    return 3;
  }

  lua_pushvalue(L, 2);
  w->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  box = lua_newuserdata(L, sizeof(*box));
  box->watch = w;
  luaL_getmetatable(L, JV_WATCH_MT);
  lua_setmetatable(L, -2);
  return 1;
}


/* handle:stop(): stops watching; safe to call twice. Dropping the last
 * reference does not stop a watch. */
static int
l_watch_stop(lua_State *L)
{
  jv_watch_box_t *box = luaL_checkudata(L, 1, JV_WATCH_MT);
  jv_watch_t *w = box->watch;

  if (w == NULL) {
    return 0;
  }

  box->watch = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, w->fn_ref);
  w->fn_ref = LUA_NOREF;
  uv_close((uv_handle_t *) &w->handle, watch_close_cb);
  return 0;
}


/* handle:path(): the watched path, or nil once stopped. */
static int
l_watch_path(lua_State *L)
{
  jv_watch_box_t *box = luaL_checkudata(L, 1, JV_WATCH_MT);
  char path[4096];
  size_t len = sizeof(path);

  if (box->watch == NULL ||
      uv_fs_event_getpath(&box->watch->handle, path, &len) != 0) {
    lua_pushnil(L);
    return 1;
  }

  lua_pushlstring(L, path, len);
  return 1;
}


/*
 * Requests on the thread pool. The request is malloc'd because the
 * parked coroutine may be collected only after it is resumed, and the
 * request must live until its callback.
 */
typedef struct {
  uv_fs_t req;
  int ref;
  const char *path; /* for messages; anchored by the parked stack */
} jv_fs_req_t;


static const char *
stat_type(uint64_t mode)
{
  switch (mode & S_IFMT) {
  case S_IFREG:
    return "file";
  case S_IFDIR:
    return "directory";
  case S_IFLNK:
    return "link";
  case S_IFIFO:
    return "fifo";
  case S_IFSOCK:
    return "socket";
  case S_IFCHR:
    return "char";
  case S_IFBLK:
    return "block";
  default:
    return "unknown";
  }
}


static double
timespec_seconds(uv_timespec_t ts)
{
  return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}


static void
push_stat(lua_State *L, const uv_stat_t *st)
{
  lua_createtable(L, 0, 12);
  lua_pushstring(L, stat_type(st->st_mode));
  lua_setfield(L, -2, "type");
  lua_pushnumber(L, (lua_Number) st->st_size);
  lua_setfield(L, -2, "size");
  lua_pushinteger(L, (lua_Integer) (st->st_mode & 07777));
  lua_setfield(L, -2, "perm");
  lua_pushinteger(L, (lua_Integer) st->st_mode);
  lua_setfield(L, -2, "mode");
  lua_pushnumber(L, (lua_Number) st->st_uid);
  lua_setfield(L, -2, "uid");
  lua_pushnumber(L, (lua_Number) st->st_gid);
  lua_setfield(L, -2, "gid");
  lua_pushnumber(L, (lua_Number) st->st_nlink);
  lua_setfield(L, -2, "nlink");
  lua_pushnumber(L, (lua_Number) st->st_ino);
  lua_setfield(L, -2, "ino");
  lua_pushnumber(L, (lua_Number) st->st_dev);
  lua_setfield(L, -2, "dev");
  lua_pushnumber(L, timespec_seconds(st->st_mtim));
  lua_setfield(L, -2, "mtime");
  lua_pushnumber(L, timespec_seconds(st->st_atim));
  lua_setfield(L, -2, "atime");
  lua_pushnumber(L, timespec_seconds(st->st_ctim));
  lua_setfield(L, -2, "ctime");
}


static void
fs_done_cb(uv_fs_t *req)
{
  jv_fs_req_t *r = req->data;
  lua_State *co = jv__co_thread(r->ref);
  int ref = r->ref, nret = 1;

  if (req->result < 0) {
    lua_pushnil(co);
    lua_pushfstring(co, "%s '%s' failed: %s",
                    uv_fs_get_type(req) == UV_FS_STAT ? "stat" : "rename",
                    r->path, jv_strerror((int) req->result));
    lua_pushstring(co, jv_err_name((int) req->result));
    nret = 3;

  } else if (uv_fs_get_type(req) == UV_FS_STAT) {
    push_stat(co, &req->statbuf);

  } else {
    lua_pushboolean(co, 1);
  }

  uv_fs_req_cleanup(req);
  free(r);
  jv__co_resume(ref, nret);
}


static jv_fs_req_t *
fs_req_new(lua_State *L, const char *path)
{
  jv_fs_req_t *r;

  if (!jv__co_parkable(L)) {
    luaL_error(L, "this call waits for the thread pool and must run in a "
                  "coroutine started by core.spawn or a core callback");
    return NULL;
  }

  r = calloc(1, sizeof(*r));
  if (r == NULL) {
    luaL_error(L, "out of memory");
    return NULL;
  }

  r->req.data = r;
  r->path = path;
  return r;
}


/* Parks the coroutine on a started request, or returns its start error. */
static int
fs_req_park(lua_State *L, jv_fs_req_t *r, int rc)
{
  if (rc != 0) {
    uv_fs_req_cleanup(&r->req);
    free(r);
    return jv__push_error(L, rc);
  }

  r->ref = jv__co_park(L);
  return lua_yield(L, 0);
}


/* core.fs.stat(path): a table (type, size, perm, mode, uid, gid, nlink,
 * ino, dev, mtime, atime, ctime), or nil, message, code. Follows
 * symbolic links. */
static int
l_fs_stat(lua_State *L)
{
  const char *path = luaL_checkstring(L, 1);
  jv_fs_req_t *r = fs_req_new(L, path);

  return fs_req_park(L, r, uv_fs_stat(jv__loop(), &r->req, path, fs_done_cb));
}


/* core.fs.rename(from, to): rename(2), atomic within one file system;
 * true, or nil, message, code. */
static int
l_fs_rename(lua_State *L)
{
  const char *from = luaL_checkstring(L, 1);
  const char *to = luaL_checkstring(L, 2);
  jv_fs_req_t *r = fs_req_new(L, from);

  return fs_req_park(L, r,
                     uv_fs_rename(jv__loop(), &r->req, from, to, fs_done_cb));
}


/* Handles one line of /proc/net/tcp: pushes its local address (hex),
 * port and inode onto the list at index t when its state is 0A
 * (TCP_LISTEN), as list[n+1..n+3]. Returns the new n. */
static int
listener_line(lua_State *L, int t, int n, const char *line, size_t len)
{
  const char *field[10];
  size_t flen[10];
  size_t i = 0;
  int f = 0;
  const char *colon;

  while (f < 10) {
    while (i < len && (line[i] == ' ' || line[i] == '\t')) {
      i++;
    }
    if (i == len) {
      return n;
    }
    field[f] = line + i;
    while (i < len && line[i] != ' ' && line[i] != '\t') {
      i++;
    }
    flen[f] = (size_t) (line + i - field[f]);
    f++;
  }

  if (flen[3] != 2 || field[3][0] != '0' || field[3][1] != 'A') {
    return n;
  }
  colon = memchr(field[1], ':', flen[1]);
  if (colon == NULL) {
    return n;
  }

  lua_pushlstring(L, field[1], (size_t) (colon - field[1]));
  lua_rawseti(L, t, ++n);
  lua_pushnumber(L, (lua_Number) strtoul(colon + 1, NULL, 16));
  lua_rawseti(L, t, ++n);
  lua_pushnumber(L, (lua_Number) strtoull(field[9], NULL, 10));
  lua_rawseti(L, t, ++n);
  return n;
}


/* core.fs.tcp_listeners(path): reads /proc/net/tcp or /proc/net/tcp6 and
 * returns a flat list address-hex, port, inode for each socket in state
 * 0A (TCP_LISTEN), or nil, message, code when the file cannot be read.
 * The file lists every socket of the machine, thousands on a busy one,
 * so reading it here spares a Lua string for each line of another state.
 * The file is small and in memory, so this reads it on the loop. */
static int
l_fs_tcp_listeners(lua_State *L)
{
  const char *path = luaL_checkstring(L, 1);
  char buf[16384];
  size_t used = 0;
  int fd, n = 0, t;

  fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return jv__push_error(L, uv_translate_sys_error(errno));
  }

  lua_newtable(L);
  t = lua_gettop(L);
  for (;;) {
    ssize_t got = read(fd, buf + used, sizeof(buf) - used);
    size_t start = 0, i;

    if (got < 0 && errno == EINTR) {
      continue;
    }
    if (got <= 0) {
      if (used > 0) {
        n = listener_line(L, t, n, buf, used);
      }
      break;
    }
    used += (size_t) got;
    for (i = 0; i < used; i++) {
      if (buf[i] == '\n') {
        n = listener_line(L, t, n, buf + start, i - start);
        start = i + 1;
      }
    }
    if (start == 0 && used == sizeof(buf)) {
      used = 0; /* a line longer than the buffer: not a socket line */
      continue;
    }
    memmove(buf, buf + start, used - start);
    used -= start;
  }

  close(fd);
  return 1;
}


int
jv__open_fs(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "watch", l_fs_watch },
                                    { "stat", l_fs_stat },
                                    { "rename", l_fs_rename },
                                    { "tcp_listeners", l_fs_tcp_listeners },
                                    { NULL, NULL } };
  static const luaL_Reg methods[] = { { "stop", l_watch_stop },
                                      { "path", l_watch_path },
                                      { NULL, NULL } };

  luaL_newmetatable(L, JV_WATCH_MT);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
