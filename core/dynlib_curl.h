/*
 * dynlib_curl.h: libcurl, loaded with dlopen() when core.curl.request
 * first runs.
 *
 * curl.c includes this header in place of <curl/curl.h>. Each libcurl
 * function it calls is a macro for a pointer in jv__curl, which dynlib.c
 * fills with dlsym() from "libcurl.so.4" on the first request. A process
 * that never sends one maps neither libcurl nor its dependencies
 * (libssh2, librtmp and GnuTLS, Kerberos, LDAP). The pointer types come
 * from curl/curl.h, so they match its prototypes.
 */
#ifndef JV_DYNLIB_CURL_H
#define JV_DYNLIB_CURL_H

#include <curl/curl.h>

/* The Debian 12 soname of libcurl, from the package libcurl4 (the OpenSSL
 * build, whose headers libcurl4-openssl-dev installs). */
#define JV_CURL_SONAME  "libcurl.so.4"
#define JV_CURL_PACKAGE "libcurl4"

/* Every libcurl function curl.c calls. A new call needs an entry here and
 * a macro below. Without the macro the executable fails to link, because
 * it does not link libcurl. */
#define JV_CURL_SYMBOLS(X)                                                     \
  X(curl_easy_cleanup)                                                         \
  X(curl_easy_getinfo)                                                         \
  X(curl_easy_init)                                                            \
  X(curl_easy_setopt)                                                          \
  X(curl_easy_strerror)                                                        \
  X(curl_free)                                                                 \
  X(curl_global_init)                                                          \
  X(curl_multi_add_handle)                                                     \
  X(curl_multi_assign)                                                         \
  X(curl_multi_info_read)                                                      \
  X(curl_multi_init)                                                           \
  X(curl_multi_remove_handle)                                                  \
  X(curl_multi_setopt)                                                         \
  X(curl_multi_socket_action)                                                  \
  X(curl_multi_strerror)                                                       \
  X(curl_slist_append)                                                         \
  X(curl_slist_free_all)                                                       \
  X(curl_url)                                                                  \
  X(curl_url_cleanup)                                                          \
  X(curl_url_get)                                                              \
  X(curl_url_set)                                                              \
  X(curl_url_strerror)

/* curl.h defines curl_easy_setopt and three others as function-like
 * macros. The preprocessor leaves such a name alone unless "(" follows. */
#define JV_CURL_POINTER(name) __typeof__(&name) name;

/* Pointers to the libcurl functions, valid once jv__curl_load() returned
 * NULL. They are written only on the loop thread and never change after
 * they are set. */
typedef struct {
  JV_CURL_SYMBOLS(JV_CURL_POINTER)
} jv_curl_api_t;

#undef JV_CURL_POINTER

extern jv_curl_api_t jv__curl;

/*
 * Loads libcurl unless it is loaded already. Returns NULL on success,
 * else a message with the library, the dlopen() or dlsym() error and the
 * package to install. A failure is not cached, so the next call tries
 * again. The environment variable JUSTAVPS_LIBCURL, when set, names the
 * file to load in place of "libcurl.so.4". Call it on the loop thread.
 */
const char *jv__curl_load(void);

/*
 * JV_DYNLIB_NO_MACROS keeps the real names for dynlib.c. CMake also
 * compiles curl.c once more with it, into an object it never links, so
 * that curl.h's GCC type checks of curl_easy_setopt and curl_easy_getinfo
 * arguments still see every call. Those checks are macros themselves,
 * which the macros below replace.
 */
#ifndef JV_DYNLIB_NO_MACROS
#undef curl_easy_getinfo
#undef curl_easy_setopt
#undef curl_multi_setopt

#define curl_easy_cleanup        (jv__curl.curl_easy_cleanup)
#define curl_easy_getinfo        (jv__curl.curl_easy_getinfo)
#define curl_easy_init           (jv__curl.curl_easy_init)
#define curl_easy_setopt         (jv__curl.curl_easy_setopt)
#define curl_easy_strerror       (jv__curl.curl_easy_strerror)
#define curl_free                (jv__curl.curl_free)
#define curl_global_init         (jv__curl.curl_global_init)
#define curl_multi_add_handle    (jv__curl.curl_multi_add_handle)
#define curl_multi_assign        (jv__curl.curl_multi_assign)
#define curl_multi_info_read     (jv__curl.curl_multi_info_read)
#define curl_multi_init          (jv__curl.curl_multi_init)
#define curl_multi_remove_handle (jv__curl.curl_multi_remove_handle)
#define curl_multi_setopt        (jv__curl.curl_multi_setopt)
#define curl_multi_socket_action (jv__curl.curl_multi_socket_action)
#define curl_multi_strerror      (jv__curl.curl_multi_strerror)
#define curl_slist_append        (jv__curl.curl_slist_append)
#define curl_slist_free_all      (jv__curl.curl_slist_free_all)
#define curl_url                 (jv__curl.curl_url)
#define curl_url_cleanup         (jv__curl.curl_url_cleanup)
#define curl_url_get             (jv__curl.curl_url_get)
#define curl_url_set             (jv__curl.curl_url_set)
#define curl_url_strerror        (jv__curl.curl_url_strerror)
#endif

#endif /* JV_DYNLIB_CURL_H */
