#include "redistls.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <sys/socket.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tandem_tls {
    SSL_CTX *ctx;
    SSL *ssl;
    int certificate_requested;  /* the server asked for a client certificate and we had none to give */
};

/* Called when the server asks for a client certificate and none was configured: noted, so that a connection the
   server then drops (TLS 1.3 refuses after the handshake) can say why. */
static int note_certificate_request(SSL *ssl, X509 **x509, EVP_PKEY **pkey) {
    (void)x509;
    (void)pkey;
    tandem_tls *t = SSL_get_app_data(ssl);
    if (t) t->certificate_requested = 1;
    return 0;
}

/* The OpenSSL errors queued on this thread, as text ("bad decrypt; PEM lib": the first says the most, the last
   where it surfaced), and the queue cleared. */
static void openssl_reason(char *out, size_t len) {
    out[0] = 0;
    size_t used = 0;
    unsigned long e;
    while ((e = ERR_get_error()) != 0) {
        const char *reason = ERR_reason_error_string(e);
        if (!reason || strstr(out, reason)) continue;
        int n = snprintf(out + used, len - used, "%s%s", used ? "; " : "", reason);
        if (n < 0 || (size_t)n >= len - used) break;
        used += (size_t)n;
    }
    if (used == 0) {
        snprintf(out, len, "%s", errno ? strerror(errno) : "the connection was closed during the handshake");
    }
    ERR_clear_error();
}

static void set_io_error(redisContext *c, const char *what) {
    c->err = REDIS_ERR_IO;
    snprintf(c->errstr, sizeof(c->errstr), "%s", what);
}

/* Maps a failed SSL_read/SSL_write: 1 = would block (non-blocking socket), 0 = the server closed, -1 = error
   (context error set; errno kept so a socket timeout reads as EAGAIN). */
static int classify(redisContext *c, SSL *ssl, int rc) {
    int saved = errno;
    int e = SSL_get_error(ssl, rc);
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        if (!(c->flags & REDIS_BLOCK)) return 1;
        /* a blocking socket only says "again" when its timeout (SO_RCVTIMEO/SO_SNDTIMEO) ran out */
        errno = EAGAIN;
        set_io_error(c, "Resource temporarily unavailable");
        return -1;
    case SSL_ERROR_ZERO_RETURN:
        set_io_error(c, "Server closed the connection");
        ERR_clear_error();
        return 0;
    case SSL_ERROR_SYSCALL:
        if (saved == 0) {
            set_io_error(c, "Server closed the connection");
            ERR_clear_error();
            return 0;
        }
        errno = saved;
        set_io_error(c, strerror(saved));
        ERR_clear_error();
        return -1;
    default: {
        char reason[120];
        openssl_reason(reason, sizeof(reason));
        char msg[128];
        snprintf(msg, sizeof(msg), "TLS: %s", reason);
        set_io_error(c, msg);
        errno = saved ? saved : EIO;
        return -1;
    }
    }
}

/* OpenSSL's socket BIO writes with write(2): to a peer that closed, that raises SIGPIPE, which kills a process
   that keeps the default disposition (a test runner, executorctl). This BIO is the socket BIO writing with
   send(MSG_NOSIGNAL) instead, so a closed peer is an EPIPE error like any other. */
static int nosignal_write(BIO *b, const char *data, int len) {
    int fd = -1;
    BIO_get_fd(b, &fd);
    errno = 0;
    int n = (int)send(fd, data, (size_t)len, MSG_NOSIGNAL);
    BIO_clear_retry_flags(b);
    if (n <= 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(b);
    return n;
}

static BIO_METHOD *nosignal_socket;
static pthread_once_t nosignal_once = PTHREAD_ONCE_INIT;

static void make_nosignal_socket(void) {
    const BIO_METHOD *plain = BIO_s_socket();
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "socket (MSG_NOSIGNAL)");
    if (!m) return;
    BIO_meth_set_write(m, nosignal_write);
    BIO_meth_set_read(m, BIO_meth_get_read(plain));
    BIO_meth_set_puts(m, BIO_meth_get_puts(plain));
    BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(plain));
    BIO_meth_set_create(m, BIO_meth_get_create(plain));
    BIO_meth_set_destroy(m, BIO_meth_get_destroy(plain));
    nosignal_socket = m;
}

/* A BIO on `fd` that never raises SIGPIPE (the socket BIO if the custom method could not be made). */
static BIO *socket_bio(int fd) {
    pthread_once(&nosignal_once, make_nosignal_socket);
    BIO *bio = BIO_new(nosignal_socket ? nosignal_socket : BIO_s_socket());
    if (bio) BIO_set_fd(bio, fd, BIO_NOCLOSE);
    return bio;
}

/* The key's password from the options (userdata), or none: without this OpenSSL's default asks on the terminal. */
static int key_password(char *buf, int size, int rwflag, void *userdata) {
    (void)rwflag;
    const char *password = userdata;
    if (!password) return 0;
    int n = (int)strlen(password);
    if (n > size) n = size;
    memcpy(buf, password, (size_t)n);
    return n;
}

static int is_ip_address(const char *host) {
    unsigned char buf[16];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

tandem_tls *tandem_tls_connect(void *context, const char *host, const tandem_tls_options *o, char *err, size_t errlen) {
    redisContext *c = context;
    char reason[200];
    tandem_tls *t = NULL;
    SSL *ssl = NULL;
    SSL_CTX *sctx = SSL_CTX_new(TLS_client_method());
    if (!sctx) {
        openssl_reason(reason, sizeof(reason));
        snprintf(err, errlen, "cannot set up TLS: %s", reason);
        goto fail;
    }
    SSL_CTX_set_min_proto_version(sctx, TLS1_2_VERSION);
    /* the output buffer grows and moves while a write waits on a full socket; partial writes let it drain */
    SSL_CTX_set_mode(sctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_AUTO_RETRY);
    if (o->verify_peer) {
        SSL_CTX_set_verify(sctx, SSL_VERIFY_PEER, NULL);
        int loaded = (o->ca_file || o->ca_path) ? SSL_CTX_load_verify_locations(sctx, o->ca_file, o->ca_path)
                                                : SSL_CTX_set_default_verify_paths(sctx);
        if (loaded != 1) {
            openssl_reason(reason, sizeof(reason));
            snprintf(err, errlen, "cannot load the CA certificates from %s: %s",
                     o->ca_file ? o->ca_file : o->ca_path ? o->ca_path : "the system store", reason);
            goto fail;
        }
    } else {
        SSL_CTX_set_verify(sctx, SSL_VERIFY_NONE, NULL);
    }
    SSL_CTX_set_default_passwd_cb(sctx, key_password);
    SSL_CTX_set_default_passwd_cb_userdata(sctx, (void *)o->key_password);
    if (o->cert_file) {
        const char *key = o->key_file ? o->key_file : o->cert_file;
        if (SSL_CTX_use_certificate_chain_file(sctx, o->cert_file) != 1) {
            openssl_reason(reason, sizeof(reason));
            snprintf(err, errlen, "cannot load the client certificate %s: %s", o->cert_file, reason);
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(sctx, key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(sctx) != 1) {
            openssl_reason(reason, sizeof(reason));
            snprintf(err, errlen, "cannot use the client key %s: %s", key, reason);
            goto fail;
        }
    } else {
        SSL_CTX_set_client_cert_cb(sctx, note_certificate_request);
    }
    t = calloc(1, sizeof(*t));
    ssl = t ? SSL_new(sctx) : NULL;
    if (!ssl) {
        openssl_reason(reason, sizeof(reason));
        snprintf(err, errlen, "cannot set up TLS: %s", t ? reason : "out of memory");
        goto fail;
    }
    SSL_set_app_data(ssl, t);
    int ip = is_ip_address(host);
    if (!ip) SSL_set_tlsext_host_name(ssl, host);  /* SNI carries names only */
    if (o->verify_peer && o->check_hostname) {
        X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(param, host) : X509_VERIFY_PARAM_set1_host(param, host, 0);
        if (ok != 1) {
            snprintf(err, errlen, "cannot check the certificate against '%s'", host);
            goto fail;
        }
    }
    BIO *bio = socket_bio(c->fd);
    if (!bio) {
        snprintf(err, errlen, "cannot set up TLS: out of memory");
        goto fail;
    }
    SSL_set_bio(ssl, bio, bio);
    ERR_clear_error();
    errno = 0;
    int rc = SSL_connect(ssl);
    if (rc != 1) {
        int e = SSL_get_error(ssl, rc);
        long verify = SSL_get_verify_result(ssl);
        if (verify != X509_V_OK) {
            snprintf(err, errlen, "the server's certificate was not accepted: %s", X509_verify_cert_error_string(verify));
        } else if ((e == SSL_ERROR_SYSCALL || e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) &&
                   (errno == EAGAIN || errno == EWOULDBLOCK)) {
            snprintf(err, errlen, "no answer to the TLS handshake within the connect timeout");
        } else {
            openssl_reason(reason, sizeof(reason));
            snprintf(err, errlen, "the TLS handshake failed: %s", reason);
        }
        if (t->certificate_requested) {
            size_t used = strlen(err);
            snprintf(err + used, errlen - used, " (the server asked for a client certificate and none is set)");
        }
        goto fail;
    }
    t->ctx = sctx;
    t->ssl = ssl;
    return t;

fail:
    ERR_clear_error();
    SSL_free(ssl);  /* each takes NULL; the SSL owns the BIO once set */
    SSL_CTX_free(sctx);
    free(t);
    return NULL;
}

const char *tandem_tls_version(const tandem_tls *t) { return SSL_get_version(t->ssl); }

int tandem_tls_certificate_requested(const tandem_tls *t) { return t->certificate_requested; }

void tandem_tls_free(tandem_tls *t) {
    if (!t) return;
    SSL_free(t->ssl);  /* no close_notify: the socket closes with the context, and a dead peer must not block us */
    SSL_CTX_free(t->ctx);
    free(t);
}

int tandem_tls_buffer_write(void *context, tandem_tls *t, int *done) {
    redisContext *c = context;
    if (c->err) return -1;
    size_t len = sdslen(c->obuf);
    if (len > 0) {
        ERR_clear_error();
        errno = 0;
        int n = SSL_write(t->ssl, c->obuf, len > INT32_MAX ? INT32_MAX : (int)len);
        if (n > 0) {
            if ((size_t)n == len) {
                sdsfree(c->obuf);
                c->obuf = sdsempty();
            } else {
                sdsrange(c->obuf, n, -1);
            }
        } else {
            int r = classify(c, t->ssl, n);
            if (r != 1) return -1;
        }
    }
    if (done) *done = sdslen(c->obuf) == 0;
    return 0;
}

int tandem_tls_buffer_read(void *context, tandem_tls *t) {
    redisContext *c = context;
    if (c->err) return -1;
    char buf[16 * 1024];
    /* drain: bytes TLS already decrypted do not make the socket readable again */
    for (;;) {
        ERR_clear_error();
        errno = 0;
        int n = SSL_read(t->ssl, buf, sizeof(buf));
        if (n > 0) {
            if (redisReaderFeed(c->reader, buf, (size_t)n) != REDIS_OK) {
                c->err = c->reader->err;
                snprintf(c->errstr, sizeof(c->errstr), "%s", c->reader->errstr);
                return -1;
            }
            if (c->flags & REDIS_BLOCK) return 0;  /* blocking: one read per call, as redisBufferRead */
            continue;
        }
        int r = classify(c, t->ssl, n);
        return r == 1 ? 0 : -1;
    }
}

int tandem_tls_get_reply(void *context, tandem_tls *t, void **reply) {
    redisContext *c = context;
    void *aux = NULL;
    if (redisGetReplyFromReader(c, &aux) != REDIS_OK) return -1;
    if (aux == NULL) {
        int done = 0;
        do {
            if (tandem_tls_buffer_write(c, t, &done) != 0) return -1;
        } while (!done);
        do {
            if (tandem_tls_buffer_read(c, t) != 0) return -1;
            if (redisGetReplyFromReader(c, &aux) != REDIS_OK) return -1;
        } while (aux == NULL);
    }
    if (reply) *reply = aux; else freeReplyObject(aux);
    return 0;
}
