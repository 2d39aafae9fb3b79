/*
 * dynlib_pq.h: libpq, loaded with dlopen() when core.pg first connects.
 *
 * pg.c includes this header in place of <libpq-fe.h>. Each libpq function
 * it calls is a macro for a pointer in jv__pq, which dynlib.c fills with
 * dlsym() from "libpq.so.5" on the first connect. A process that never
 * connects maps neither libpq nor its dependencies (Kerberos, LDAP and,
 * through LDAP, GnuTLS). The pointer types come from libpq-fe.h, so they
 * match its prototypes.
 */
#ifndef JV_DYNLIB_PQ_H
#define JV_DYNLIB_PQ_H

#include <libpq-fe.h>

/* The Debian 12 soname of libpq, from the package libpq5. */
#define JV_PQ_SONAME  "libpq.so.5"
#define JV_PQ_PACKAGE "libpq5"

/* Every libpq function pg.c calls. A new call needs an entry here and a
 * macro below. Without the macro the executable fails to link, because it
 * does not link libpq. */
#define JV_PQ_SYMBOLS(X)                                                       \
  X(PQbackendPID)                                                              \
  X(PQcancel)                                                                  \
  X(PQclear)                                                                   \
  X(PQcmdStatus)                                                               \
  X(PQcmdTuples)                                                               \
  X(PQconnectPoll)                                                             \
  X(PQconnectStartParams)                                                      \
  X(PQconsumeInput)                                                            \
  X(PQerrorMessage)                                                            \
  X(PQescapeIdentifier)                                                        \
  X(PQfinish)                                                                  \
  X(PQflush)                                                                   \
  X(PQfname)                                                                   \
  X(PQfreeCancel)                                                              \
  X(PQfreemem)                                                                 \
  X(PQftype)                                                                   \
  X(PQgetCancel)                                                               \
  X(PQgetResult)                                                               \
  X(PQgetisnull)                                                               \
  X(PQgetlength)                                                               \
  X(PQgetvalue)                                                                \
  X(PQisBusy)                                                                  \
  X(PQnfields)                                                                 \
  X(PQnotifies)                                                                \
  X(PQntuples)                                                                 \
  X(PQresultErrorField)                                                        \
  X(PQresultErrorMessage)                                                      \
  X(PQresultStatus)                                                            \
  X(PQsendQueryParams)                                                         \
  X(PQsetErrorVerbosity)                                                       \
  X(PQsetNoticeReceiver)                                                       \
  X(PQsetnonblocking)                                                          \
  X(PQsocket)                                                                  \
  X(PQstatus)                                                                  \
  X(PQtransactionStatus)                                                       \
  X(PQunescapeBytea)

#define JV_PQ_POINTER(name) __typeof__(&name) name;

/* Pointers to the libpq functions, valid once jv__pq_load() returned NULL.
 * They are written only on the loop thread, before any pointer is used,
 * and never change after, so the thread pool may call PQcancel too. */
typedef struct {
  JV_PQ_SYMBOLS(JV_PQ_POINTER)
} jv_pq_api_t;

#undef JV_PQ_POINTER

extern jv_pq_api_t jv__pq;

/*
 * Loads libpq unless it is loaded already. Returns NULL on success, else
 * a message with the library, the dlopen() or dlsym() error and the
 * package to install. A failure is not cached, so installing the package
 * fixes a running process. The environment variable JUSTAVPS_LIBPQ, when
 * set, names the file to load in place of "libpq.so.5". Call it on the
 * loop thread.
 */
const char *jv__pq_load(void);

#ifndef JV_DYNLIB_NO_MACROS
#define PQbackendPID         (jv__pq.PQbackendPID)
#define PQcancel             (jv__pq.PQcancel)
#define PQclear              (jv__pq.PQclear)
#define PQcmdStatus          (jv__pq.PQcmdStatus)
#define PQcmdTuples          (jv__pq.PQcmdTuples)
#define PQconnectPoll        (jv__pq.PQconnectPoll)
#define PQconnectStartParams (jv__pq.PQconnectStartParams)
#define PQconsumeInput       (jv__pq.PQconsumeInput)
#define PQerrorMessage       (jv__pq.PQerrorMessage)
#define PQescapeIdentifier   (jv__pq.PQescapeIdentifier)
#define PQfinish             (jv__pq.PQfinish)
#define PQflush              (jv__pq.PQflush)
#define PQfname              (jv__pq.PQfname)
#define PQfreeCancel         (jv__pq.PQfreeCancel)
#define PQfreemem            (jv__pq.PQfreemem)
#define PQftype              (jv__pq.PQftype)
#define PQgetCancel          (jv__pq.PQgetCancel)
#define PQgetResult          (jv__pq.PQgetResult)
#define PQgetisnull          (jv__pq.PQgetisnull)
#define PQgetlength          (jv__pq.PQgetlength)
#define PQgetvalue           (jv__pq.PQgetvalue)
#define PQisBusy             (jv__pq.PQisBusy)
#define PQnfields            (jv__pq.PQnfields)
#define PQnotifies           (jv__pq.PQnotifies)
#define PQntuples            (jv__pq.PQntuples)
#define PQresultErrorField   (jv__pq.PQresultErrorField)
#define PQresultErrorMessage (jv__pq.PQresultErrorMessage)
#define PQresultStatus       (jv__pq.PQresultStatus)
#define PQsendQueryParams    (jv__pq.PQsendQueryParams)
#define PQsetErrorVerbosity  (jv__pq.PQsetErrorVerbosity)
#define PQsetNoticeReceiver  (jv__pq.PQsetNoticeReceiver)
#define PQsetnonblocking     (jv__pq.PQsetnonblocking)
#define PQsocket             (jv__pq.PQsocket)
#define PQstatus             (jv__pq.PQstatus)
#define PQtransactionStatus  (jv__pq.PQtransactionStatus)
#define PQunescapeBytea      (jv__pq.PQunescapeBytea)
#endif

#endif /* JV_DYNLIB_PQ_H */
