/*
 * dynlib.c: loads libpq and libcurl with dlopen() on first use.
 *
 * Only the roles that talk to PostgreSQL or to outside HTTPS services use
 * these libraries. Linking them made every process map both and their
 * dependencies at start-up, the machine daemon included (about 4 MiB of
 * RSS), and made a machine install libpq5 and libcurl4 to start the
 * daemon. The functions are resolved here on the first core.pg.connect or
 * core.curl.request instead. The Debian runtime sonames are loaded, so
 * the distribution's security updates still apply.
 */
#define JV_DYNLIB_NO_MACROS
#include "dynlib_curl.h"
#include "dynlib_pq.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

/* Room for the message: a path, dlerror()'s text and the advice. */
#define JV_DYNLIB_MESSAGE_SIZE 768

typedef struct {
  const char *soname;
  const char *env;     /* names a file to load instead of soname */
  const char *package; /* the Debian package that installs soname */
  void *handle;        /* non-NULL once every symbol is resolved */
  char message[JV_DYNLIB_MESSAGE_SIZE];
} jv_dynlib_t;

jv_pq_api_t jv__pq;
jv_curl_api_t jv__curl;

static jv_dynlib_t pq_lib = { JV_PQ_SONAME, "JUSTAVPS_LIBPQ", JV_PQ_PACKAGE,
                              NULL, "" };
static jv_dynlib_t curl_lib = { JV_CURL_SONAME, "JUSTAVPS_LIBCURL",
                                JV_CURL_PACKAGE, NULL, "" };


/* Returns the file to load: the override from the environment when it is
 * set and not empty, else the soname. */
static const char *
dynlib_file(const jv_dynlib_t *lib)
{
  const char *file = getenv(lib->env);

  return file != NULL && file[0] != '\0' ? file : lib->soname;
}


/* Writes to lib->message what failed to load, why, and which package to
 * install. */
static void
dynlib_fail(jv_dynlib_t *lib, const char *what, const char *reason)
{
  int overridden = dynlib_file(lib) != lib->soname;

  snprintf(lib->message, sizeof(lib->message),
           "failed to load %s: %s. Install the Debian package %s%s%s.", what,
           reason != NULL ? reason : "unknown error", lib->package,
           overridden ? " or unset " : "", overridden ? lib->env : "");
}


/* dlopen()s the library with RTLD_NOW, so a dependency that is missing or
 * lacks a symbol fails here and not at some later call. Returns the
 * handle, or NULL with lib->message set. */
static void *
dynlib_open(jv_dynlib_t *lib)
{
  void *handle = dlopen(dynlib_file(lib), RTLD_NOW | RTLD_LOCAL);

  if (handle == NULL) {
    dynlib_fail(lib, lib->soname, dlerror());
  }

  return handle;
}


/* Returns the address of symbol name, or NULL with lib->message set. */
static void *
dynlib_symbol(jv_dynlib_t *lib, void *handle, const char *name)
{
  char what[128];
  void *address;

  dlerror();
  address = dlsym(handle, name);
  if (address == NULL) {
    snprintf(what, sizeof(what), "%s from %s", name, dynlib_file(lib));
    dynlib_fail(lib, what, dlerror());
  }

  return address;
}


/* Stores the address of symbol name in api.name, or returns -1 from the
 * enclosing function with lib->message set. */
#define JV_DYNLIB_RESOLVE(api, lib, handle, name)                              \
  do {                                                                         \
    void *address_ = dynlib_symbol(lib, handle, #name);                        \
    if (address_ == NULL) {                                                    \
      return -1;                                                               \
    }                                                                          \
    (api).name = (__typeof__((api).name)) address_;                            \
  } while (0);


/* Each resolver fills a local table and publishes it only once every
 * symbol resolved, so a failed load leaves jv__pq or jv__curl untouched. */
static int
pq_resolve(jv_dynlib_t *lib, void *handle)
{
  jv_pq_api_t api;

#define JV_PQ_RESOLVE(name) JV_DYNLIB_RESOLVE(api, lib, handle, name)
  JV_PQ_SYMBOLS(JV_PQ_RESOLVE)
#undef JV_PQ_RESOLVE

  jv__pq = api;
  return 0;
}


static int
curl_resolve(jv_dynlib_t *lib, void *handle)
{
  jv_curl_api_t api;

#define JV_CURL_RESOLVE(name) JV_DYNLIB_RESOLVE(api, lib, handle, name)
  JV_CURL_SYMBOLS(JV_CURL_RESOLVE)
#undef JV_CURL_RESOLVE

  jv__curl = api;
  return 0;
}


/* Opens lib and resolves its symbols unless that succeeded before.
 * Returns NULL, or lib->message after a failure, which is not cached. */
static const char *
dynlib_load(jv_dynlib_t *lib, int (*resolve)(jv_dynlib_t *, void *))
{
  void *handle;

  if (lib->handle != NULL) {
    return NULL;
  }

  handle = dynlib_open(lib);
  if (handle == NULL) {
    return lib->message;
  }

  if (resolve(lib, handle) != 0) {
    dlclose(handle);
    return lib->message;
  }

  lib->handle = handle;
  return NULL;
}


const char *
jv__pq_load(void)
{
  return dynlib_load(&pq_lib, pq_resolve);
}


const char *
jv__curl_load(void)
{
  return dynlib_load(&curl_lib, curl_resolve);
}
