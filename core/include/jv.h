/*
 * jv.h: the public interface of the justavps C core.
 *
 * The core offers mechanisms (event loop, sockets, HTTP, WebSocket, crypto,
 * processes) to Lua and knows no role, policy or provider by name. Lua reaches
 * it through require("justavps.core"); docs/lua-api.md is the reference.
 */
#ifndef JV_H
#define JV_H

#include <stddef.h>
#include <stdint.h>

#ifndef JV_VERSION
#define JV_VERSION "0.0.0"
#endif

/*
 * Error codes. Functions return 0 or a negative code: either a libuv code
 * (UV_E*, which are negated errno values) or one of these, which sit below
 * libuv's range. Each has a stable name that Lua sees as the third return
 * value, and a message for people.
 */
#define JV_ERRNO_MAP(XX)                                                       \
  XX(TIMEOUT, -5001, "timeout", "operation timed out")                         \
  XX(CLOSED, -5002, "closed", "connection closed")                             \
  XX(INVALID, -5003, "invalid", "invalid argument")                            \
  XX(TOOLARGE, -5004, "too_large", "size limit exceeded")                      \
  XX(FULL, -5005, "full", "cache is at its memory bound")                      \
  XX(TLS, -5006, "tls_error", "TLS failure")                                   \
  XX(PROTOCOL, -5007, "protocol_error", "protocol violation")                  \
  XX(BUSY, -5008, "busy", "operation already in progress")                     \
  XX(NOMEM, -5009, "no_memory", "out of memory")                               \
  XX(CANCELED, -5010, "canceled", "operation canceled")

enum {
#define XX(name, value, word, message) JV_E##name = value,
  JV_ERRNO_MAP(XX)
#undef XX
};

/* Returns a stable lower-case name for code, such as "timeout". */
const char *jv_err_name(int code);

/* Returns a human-readable message for code. */
const char *jv_strerror(int code);

/* Log levels with fixed meanings. */
typedef enum {
  JV_LOG_DEBUG = 0, /* developer tracing, off unless asked for */
  JV_LOG_INFO,      /* a start, a stop, a reload, an access line */
  JV_LOG_WARN,      /* a rejected client, a retry, a degraded path */
  JV_LOG_ERR,       /* a request or operation failed */
  JV_LOG_ALERT,     /* something that should never happen did */
} jv_log_level_t;

/*
 * Writes one logfmt line to stderr: time, level, role, msg, then the
 * key/value pairs given as a NULL-terminated list of const char * pairs.
 * Values are quoted when needed. Never pass a secret.
 */
void jv_log(jv_log_level_t level, const char *msg, ...);

void jv_log_set_role(const char *role);
void jv_log_set_level(jv_log_level_t level);
int jv_log_enabled(jv_log_level_t level);

/* Buffers log lines and flushes them on a timer and at each error line.
 * Meant for a stderr that is a file or a pipe, not a terminal. */
void jv_log_set_buffered(int on);

#endif /* JV_H */
