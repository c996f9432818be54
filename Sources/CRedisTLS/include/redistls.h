#ifndef TANDEM_REDIS_TLS_H
#define TANDEM_REDIS_TLS_H
#include <stddef.h>

/* TLS for Redis connections (`rediss://`), on OpenSSL. Debian's hiredis (0.14) has no TLS, so a TLS connection
   keeps hiredis for what it does without touching the socket — formatting commands into its output buffer and
   parsing replies with its reader — and moves the bytes itself through an SSL object on hiredis's socket.
   `ctx` is a `redisContext *` (void * here so Swift sees one redisContext type, CHiredis's).

   Every call returns 0 on success and -1 on failure, with hiredis's err/errstr set on the context (REDIS_ERR_IO,
   errno kept: EAGAIN means a socket timeout) or, for the handshake, a sentence in `err`. */

typedef struct tandem_tls tandem_tls;

/* What to check about the server, and which client certificate to show (all paths may be NULL). */
typedef struct {
    int verify_peer;        /* 0: accept any certificate (ssl_cert_reqs=none) */
    int check_hostname;     /* with verify_peer: the certificate must name `host` (DNS name or IP address) */
    const char *ca_file;    /* NULL (and no ca_path): the system's CA store */
    const char *ca_path;    /* a directory of hashed CA certificates (`openssl rehash`), or NULL */
    const char *cert_file;  /* client certificate chain (PEM), for servers that set tls-auth-clients */
    const char *key_file;   /* its private key (PEM); NULL: in cert_file */
    const char *key_password; /* for an encrypted key; NULL: never ask (OpenSSL would prompt on a terminal) */
} tandem_tls_options;

/* Runs the TLS handshake on the context's connected, blocking socket (its timeouts apply). NULL on failure, with
   the reason in `err`. */
tandem_tls *tandem_tls_connect(void *ctx, const char *host, const tandem_tls_options *options, char *err, size_t errlen);

/* The negotiated protocol, e.g. "TLSv1.3". */
const char *tandem_tls_version(const tandem_tls *tls);

/* 1 if the server asked for a client certificate and none was configured (it may refuse the session after the
   handshake: TLS 1.3 says so at the first read, or the connection is simply reset). */
int tandem_tls_certificate_requested(const tandem_tls *tls);

void tandem_tls_free(tandem_tls *tls);

/* Blocking socket: hiredis's redisGetReply, reading and writing through TLS. */
int tandem_tls_get_reply(void *ctx, tandem_tls *tls, void **reply);

/* Non-blocking socket: hiredis's redisBufferWrite (writes what the socket takes; *done = 1 once the output buffer
   is empty) and redisBufferRead (reads everything TLS has and feeds the reader; nothing to read is not an error). */
int tandem_tls_buffer_write(void *ctx, tandem_tls *tls, int *done);
int tandem_tls_buffer_read(void *ctx, tandem_tls *tls);

#endif
