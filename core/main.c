/*
 * main.c: the justavps executable.
 *
 * It creates one LuaJIT state, makes the core loadable as
 * require("justavps.core"), points package.path at the Lua tree and hands
 * the command line to justavps.cli, which parses options, starts the role
 * and runs the loop. The exit status is what cli.main returns.
 */
#include "internal.h"

#include <lualib.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int luaopen_justavps_core(lua_State *L);

/* The Lua tree compiled in by tools/embed_lua.lua (build/embedded_lua.c). */
typedef struct {
  const char *name;
  const char *chunkname;
  const char *source;
  size_t size;
} jv_embedded_t;

extern const jv_embedded_t jv_embedded_modules[];


static int
file_exists(const char *path)
{
  return access(path, R_OK) == 0;
}


/*
 * Finds the tree holding lua/justavps/cli.lua: $JUSTAVPS_ROOT, then the
 * parent of the executable's directory (build/justavps in a checkout), then
 * the source directory this binary was built from.
 */
static int
find_root(char *root, size_t size)
{
  const char *env = getenv("JUSTAVPS_ROOT");
  char exe[PATH_MAX], probe[PATH_MAX + 64];
  ssize_t n;
  char *slash;

  if (env != NULL && *env != '\0') {
    snprintf(root, size, "%s", env);
    return 0;
  }

  n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    exe[n] = '\0';
    slash = strrchr(exe, '/');
    if (slash != NULL) {
      *slash = '\0';
      slash = strrchr(exe, '/');
      if (slash != NULL) {
        *slash = '\0';
        snprintf(probe, sizeof(probe), "%s/lua/justavps/cli.lua", exe);
        if (file_exists(probe)) {
          snprintf(root, size, "%s", exe);
          return 0;
        }
      }
    }
  }

  snprintf(probe, sizeof(probe), "%s/lua/justavps/cli.lua", JV_SOURCE_DIR);
  if (file_exists(probe)) {
    snprintf(root, size, "%s", JV_SOURCE_DIR);
    return 0;
  }

  return -1;
}


static void
set_paths(lua_State *L, const char *root)
{
  lua_getglobal(L, "package");

  lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s/?.lua;", root, root,
                  root);
  lua_getfield(L, -2, "path");
  lua_concat(L, 2);
  lua_setfield(L, -2, "path");

  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_justavps_core);
  lua_setfield(L, -2, "justavps.core");
  lua_pop(L, 2);

  lua_pushstring(L, root);
  lua_setglobal(L, "JUSTAVPS_ROOT");
}


/* Returns the embedded module called name, or NULL. */
static const jv_embedded_t *
find_embedded(const char *name)
{
  const jv_embedded_t *m;

  for (m = jv_embedded_modules; m->name != NULL; m++) {
    if (strcmp(m->name, name) == 0) {
      return m;
    }
  }

  return NULL;
}


/*
 * package.loaders entry for the embedded tree. It comes after the file
 * loaders, so a module on disk wins and hot reload keeps working in a
 * checkout, while a lone binary on a machine still finds every module.
 */
static int
embedded_loader(lua_State *L)
{
  const char *name = luaL_checkstring(L, 1);
  const jv_embedded_t *m = find_embedded(name);

  if (m == NULL) {
    lua_pushfstring(L, "\n\tno embedded module '%s'", name);
    return 1;
  }

  if (luaL_loadbuffer(L, m->source, m->size, m->chunkname) != 0) {
    return lua_error(L);
  }

  return 1;
}


/* __index of package.embedded: true for the name of an embedded module,
 * else nil. The result is not stored, so the table stays empty. */
static int
embedded_index(lua_State *L)
{
  const char *name = lua_tostring(L, 2);

  if (name != NULL && find_embedded(name) != NULL) {
    lua_pushboolean(L, 1);
  } else {
    lua_pushnil(L);
  }

  return 1;
}


/*
 * Installs the loader and package.embedded, which maps the name of each
 * embedded module to true, for code that checks whether a module exists
 * (the role registry). The names are looked up on access and not copied
 * into the table at start. The longer names lie in .rodata between the
 * module sources, and reading them all at start added about 350 KiB of the
 * binary to RSS (/proc/PID/smaps of the daemon, x86-64 build).
 */
static void
add_embedded_loader(lua_State *L)
{
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaders");
  lua_pushcfunction(L, embedded_loader);
  lua_rawseti(L, -2, (int) lua_objlen(L, -2) + 1);
  lua_pop(L, 1);

  lua_newtable(L);
  lua_newtable(L);
  lua_pushcfunction(L, embedded_index);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_setfield(L, -2, "embedded");
  lua_pop(L, 1);
}


static int
traceback(lua_State *L)
{
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}


int
main(int argc, char **argv)
{
  char root[PATH_MAX];
  lua_State *L;
  int i, status, have_root;

  if (argc == 2 && strcmp(argv[1], "--version") == 0) {
    printf("justavps %s\n", JV_VERSION);
    return 0;
  }

  if (argc >= 2 && strcmp(argv[1], "daemon") == 0) {
    /* Every machine runs a daemon: it loads OpenSSL's error strings only
     * when it has an error to report. */
    jv__openssl_no_strings();
  }

  /* Without a tree on disk every module comes from the embedded copy. */
  have_root = find_root(root, sizeof(root)) == 0;

  L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "justavps: cannot create the Lua state\n");
    return 1;
  }

  luaL_openlibs(L);
  if (have_root) {
    set_paths(L, root);

  } else {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_justavps_core);
    lua_setfield(L, -2, "justavps.core");
    lua_pop(L, 2);
  }
  add_embedded_loader(L);
  jv_log_set_buffered(!isatty(STDERR_FILENO));

  lua_pushcfunction(L, traceback);
  lua_getglobal(L, "require");
  lua_pushstring(L, "justavps.cli");

  if (lua_pcall(L, 1, 1, 1) != 0) {
    fprintf(stderr, "justavps: %s\n", lua_tostring(L, -1));
    return 1;
  }

  lua_getfield(L, -1, "main");
  lua_newtable(L);
  for (i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }

  if (lua_pcall(L, 1, 1, 1) != 0) {
    fprintf(stderr, "justavps: %s\n", lua_tostring(L, -1));
    return 1;
  }

  status = (int) luaL_optinteger(L, -1, 0);

  /* Handles may still be open after a drain; the process ends here and the
   * kernel reclaims them. */
  lua_close(L);
  return status;
}
