/* broker_amqp.c - the RabbitMQ backend (librabbitmq-c 0.11, AMQP 0-9-1).
 *
 * Two connections, each opened on first use and dropped on any error (the next
 * call re-opens it): "consume" carries basic.consume deliveries and acks;
 * "publish" is in confirm mode and only publishes, so confirms never interleave
 * with deliveries. Topology: docs/contract.md, "RabbitMQ". An amqps:// URL opens
 * both over TLS (new_socket: the one place a RabbitMQ socket is made).
 *
 * rabbitmq.url may list the nodes of one cluster: a connection opens to the node
 * that last worked in this process (at first the first of the list; list them in
 * another order on each host to spread the connections); when it cannot, it moves
 * to the next node, and so on once round the list (open_conn). Command queues
 * are quorum queues (their queue_type), so every node serves them; docs/scaling.md.
 *
 * A silent node (frozen, its host cut off with the connections open) is found
 * by bounds, all from broker.reply_timeout_ms (T): heartbeats negotiated at T/2
 * (librabbitmq gives up a read or a write after two missed ones, so within T of
 * the node's last frame), every RPC and the login bounded by T
 * (amqp_set_rpc_timeout, amqp_set_handshake_timeout), a publish's confirms by
 * T. A bound that fires says so (broker_note BROKER_SILENT), drops the
 * connection without the close handshake, and moves this process to the next
 * node of the list (silent_node), so the next open does not wait for the same
 * node again.
 */
#include "broker_backend.h"

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHANNEL 1
/* amqps:// without rabbitmq.ca_file: the system's trust store (Debian's ca-certificates) */
#define SYSTEM_CA_FILE "/etc/ssl/certs/ca-certificates.crt"

struct amqp_broker {
    struct broker base;
    amqp_connection_state_t consume, publish;
    uint64_t publish_tag;      /* last delivery tag used on the publish channel */
    int64_t publish_heard_ms;  /* monotonic ms the publish connection last answered (probe_idle) */
    bool probe_open;           /* PROBE_CHANNEL is open on the publish connection (passive_count) */
    char *url;                 /* the node's URL in use; amqp_parse_url writes into this copy */
    struct amqp_connection_info info;
    int nurls, url_at;         /* rabbitmq.url lists nurls nodes; info is of node url_at */
    char queue[256], dead[256];
    char commands_ex[256], events_ex[256];
    bool consuming;
    int prefetch;
    uint64_t ack_held;         /* a multiple ack up to this tag, not sent yet (0: none) */
    int ack_held_n;            /* how many deliveries it covers */
    bool tls_unclear;          /* the last login broke on a TLS error that named no reason (login) */
};

/* A NUL-terminated malloc'd copy of bytes (an empty body has bytes == NULL);
 * aborts when out of memory (xmalloc): a delivery has no error to return. */
static char *copy_bytes(amqp_bytes_t b) {
    char *s = xmalloc(b.len + 1);
    if (b.len) memcpy(s, b.bytes, b.len);
    s[b.len] = '\0';
    return s;
}

/* How long the close handshake of drop may wait for the server's close-ok. */
#define CLOSE_WAIT_MS 1000

static void drop(amqp_connection_state_t *c) {
    if (!*c) return;
    struct timeval tv = {CLOSE_WAIT_MS / 1000, (CLOSE_WAIT_MS % 1000) * 1000};
    amqp_set_rpc_timeout(*c, &tv); /* a silent server does not hold the close */
    amqp_connection_close(*c, AMQP_REPLY_SUCCESS); /* best effort; ignores errors */
    amqp_destroy_connection(*c);
    *c = NULL;
}

/* Drops c without the close handshake (its server is silent: nothing would answer). */
static void drop_silent(amqp_connection_state_t *c) {
    if (!*c) return;
    amqp_destroy_connection(*c);
    *c = NULL;
}

/* Drops the consume connection; its delivery tags, and an ack held for them, go with it. */
static void drop_consume(struct amqp_broker *a) {
    drop(&a->consume);
    a->ack_held = 0;
    a->ack_held_n = 0;
}

/* Acks tag (with multiple, every delivery up to it) on the consume channel.
 * Without the channel, or when the ack cannot be sent (the connection is then
 * dropped), RabbitMQ redelivers those messages and the worker finds them done:
 * said in the log, not an error for the caller. */
static void send_ack(struct amqp_broker *a, uint64_t tag, bool multiple) {
    int rc = a->consume ? amqp_basic_ack(a->consume, CHANNEL, tag, multiple) : AMQP_STATUS_CONNECTION_CLOSED;
    if (rc != AMQP_STATUS_OK) {
        log_warn("rabbitmq ack: %s; the message%s will be redelivered and found done",
                 a->consume ? amqp_error_string2(rc) : "the connection was lost", multiple ? "s" : "");
        drop_consume(a);
    }
}

/* Sends the held multiple ack, if any. */
static void send_held_ack(struct amqp_broker *a) {
    uint64_t tag = a->ack_held;
    a->ack_held = 0;
    a->ack_held_n = 0;
    if (tag) send_ack(a, tag, true);
}

static int select_node(struct amqp_broker *a, int i);
static int node_last_good;

/* A bound fired on a silent node (see the header): says so (broker_note), sets
 * the reason in a->base.err (fmt, with " (moving to node i of n)" when the list
 * has another), and makes the next node of the list the one the next open of
 * this process tries first. Returns CV_ERETRY. The caller drops the connection
 * (drop_silent: no close handshake). */
static int silent_node(struct amqp_broker *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int silent_node(struct amqp_broker *a, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->base.err, sizeof a->base.err, fmt, ap);
    va_end(ap);
    broker_note(BROKER_SILENT, 0);
    if (a->nurls > 1) {
        int next = (a->url_at + 1) % a->nurls;
        size_t n = strlen(a->base.err);
        char host[256];
        snprintf(host, sizeof host, "%s:%d", a->info.host, a->info.port);
        if (select_node(a, next) == 0) {
            node_last_good = next;
            snprintf(a->base.err + n, sizeof a->base.err - n, " (%s is silent: moving to node %d of %d, %s:%d)", host,
                     next + 1, a->nurls, a->info.host, a->info.port);
        }
    }
    log_warn("%s", a->base.err);
    return CV_ERETRY;
}

/* Turns an RPC reply into 0, or a class with the reason in b->err. A refused
 * request (channel or connection closed by the server) is CV_EREFUSED; a lost
 * connection CV_ERETRY. Either way the caller drops the connection. */
static int rpc_check(struct amqp_broker *a, amqp_rpc_reply_t r, const char *what) {
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return 0;
    case AMQP_RESPONSE_NONE: return broker_fail(&a->base, CV_ERETRY, "rabbitmq %s: missing reply", what);
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        if (r.library_error == AMQP_STATUS_TIMEOUT || r.library_error == AMQP_STATUS_HEARTBEAT_TIMEOUT)
            return silent_node(a, "rabbitmq %s: no reply within %d ms (%s)", what, a->base.cfg->broker_reply_timeout_ms,
                               amqp_error_string2(r.library_error));
        return broker_fail(&a->base, CV_ERETRY, "rabbitmq %s: %s", what, amqp_error_string2(r.library_error));
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            return broker_fail(&a->base, CV_EREFUSED, "rabbitmq %s: %.*s", what, (int)m->reply_text.len,
                               (char *)m->reply_text.bytes);
        }
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            return broker_fail(&a->base, m->reply_code == AMQP_CONNECTION_FORCED ? CV_ERETRY : CV_EREFUSED,
                               "rabbitmq %s: %.*s", what, (int)m->reply_text.len, (char *)m->reply_text.bytes);
        }
        return broker_fail(&a->base, CV_EREFUSED, "rabbitmq %s: server error 0x%08x", what, r.reply.id);
    }
    return broker_fail(&a->base, CV_EREFUSED, "rabbitmq %s: unknown reply", what);
}

/* The TLS session of this thread's last completed handshake (tls_info), for a
 * look at what the server said before we write (open_node_once); it lives as
 * long as its connection. */
static _Thread_local SSL *handshake_ssl;

/* OpenSSL's info callback of every RabbitMQ TLS context: notes the session whose handshake is done. */
static void tls_info(const SSL *ssl, int where, int ret) {
    (void)ret;
    if (where & SSL_CB_HANDSHAKE_DONE) handshake_ssl = (SSL *)ssl;
}

/* Makes the socket of connection c (which owns it) in *out: plain TCP for
 * amqp://; for amqps:// TLS that verifies the broker's certificate chain
 * (against rabbitmq.ca_file, else the system's trust store) and that it names
 * the URL's host, and presents the client certificate of rabbitmq.cert_file and
 * key_file if set. Returns 0, or a class with the reason in a->base.err
 * (CV_ECONFIG when a certificate file cannot be used). */
static int new_socket(struct amqp_broker *a, amqp_connection_state_t c, amqp_socket_t **out) {
    const struct cfg *cfg = a->base.cfg;
    amqp_socket_t *s = a->info.ssl ? amqp_ssl_socket_new(c) : amqp_tcp_socket_new(c);
    if (!s) return broker_fail(&a->base, CV_ERETRY, "rabbitmq: cannot make a %s socket", a->info.ssl ? "TLS" : "TCP");
    if (a->info.ssl) {
        SSL_CTX_set_info_callback(amqp_ssl_socket_get_context(s), tls_info);
        amqp_ssl_socket_set_verify_peer(s, 1);
        amqp_ssl_socket_set_verify_hostname(s, 1);
        const char *ca = cfg->rabbitmq_ca_file ? cfg->rabbitmq_ca_file : SYSTEM_CA_FILE;
        if (amqp_ssl_socket_set_cacert(s, ca) != AMQP_STATUS_OK)
            return broker_fail(&a->base, CV_ECONFIG, "rabbitmq: cannot read the CA certificates in '%s' (%s)", ca,
                               cfg->rabbitmq_ca_file ? "rabbitmq.ca_file" : "the system's; set rabbitmq.ca_file");
        if (cfg->rabbitmq_cert_file &&
            amqp_ssl_socket_set_key(s, cfg->rabbitmq_cert_file, cfg->rabbitmq_key_file) != AMQP_STATUS_OK)
            return broker_fail(&a->base, CV_ECONFIG,
                               "rabbitmq: cannot use the client certificate '%s' with the key '%s' (rabbitmq.cert_file "
                               "and key_file: PEM, the key unencrypted and that certificate's)",
                               cfg->rabbitmq_cert_file, cfg->rabbitmq_key_file);
    }
    *out = s;
    return 0;
}

/* The reason of this thread's last TLS error when it is the server refusing
 * our client certificate, or the lack of one: an alert (unknown CA, bad,
 * unsupported, revoked, expired or unknown certificate; certificate required;
 * access denied), as OpenSSL words it ("tlsv1 alert unknown ca", a static
 * string); else NULL. librabbitmq-c leaves OpenSSL's error queue as a failed
 * handshake or read left it, so call this before the connection is destroyed. */
static const char *client_cert_refusal(void) {
    unsigned long e = ERR_peek_last_error();
    if (!e || ERR_GET_LIB(e) != ERR_LIB_SSL) return NULL;
    switch (ERR_GET_REASON(e)) {
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
    case SSL_R_TLSV1_ALERT_ACCESS_DENIED: {
        const char *why = ERR_reason_error_string(e);
        return why ? why : "a TLS alert";
    }
    default: return NULL;
    }
}

/* If the last TLS error is the server refusing our client certificate
 * (client_cert_refusal): CV_ECONFIG with the reason in a->base.err, naming the
 * server and the setting (rabbitmq.cert_file; never the key); else 0. */
static int cert_refused(struct amqp_broker *a) {
    const char *why = client_cert_refusal();
    if (!why) return 0;
    const char *cert = a->base.cfg->rabbitmq_cert_file;
    if (!cert)
        return broker_fail(&a->base, CV_ECONFIG,
                           "rabbitmq %s:%d: TLS: the server wants a client certificate and none is set (%s): set "
                           "rabbitmq.cert_file and key_file", a->info.host, a->info.port, why);
    return broker_fail(&a->base, CV_ECONFIG,
                       "rabbitmq %s:%d: TLS: the server refused the client certificate of rabbitmq.cert_file '%s' "
                       "(%s: not signed by a CA it trusts, or expired, or not for client use)",
                       a->info.host, a->info.port, cert, why);
}

/* Why a socket did not open, in a->base.err: a certificate TLS refused, the
 * server's or (cert_refused) ours, is CV_ECONFIG (configuration: it will not
 * pass on its own), anything else CV_ERETRY. Call it before the connection is
 * destroyed (cert_refused reads the TLS error left by the handshake). */
static int open_failed(struct amqp_broker *a, int status) {
    const char *where = a->base.cfg->rabbitmq_ca_file ? "rabbitmq.ca_file" : "the system's trust store";
    int refused = a->info.ssl ? cert_refused(a) : 0;
    if (refused) return refused;
    switch (status) {
    case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED:
        return broker_fail(&a->base, CV_ECONFIG,
                           "rabbitmq %s:%d: TLS: the server's certificate is not for host '%s' (the RabbitMQ URL "
                           "must name the host as its certificate does)", a->info.host, a->info.port, a->info.host);
    case AMQP_STATUS_SSL_PEER_VERIFY_FAILED:
        return broker_fail(&a->base, CV_ECONFIG,
                           "rabbitmq %s:%d: TLS: the server's certificate is not trusted (not signed by a CA of "
                           "%s, or expired)", a->info.host, a->info.port, where);
    case AMQP_STATUS_SSL_CONNECTION_FAILED:
        return broker_fail(&a->base, CV_ERETRY,
                           "rabbitmq %s:%d: TLS handshake failed (is the port TLS? does the server want a client "
                           "certificate, rabbitmq.cert_file?)", a->info.host, a->info.port);
    default:
        return broker_fail(&a->base, CV_ERETRY, "rabbitmq %s:%d: %s", a->info.host, a->info.port,
                           amqp_error_string2(status));
    }
}

/* A login the server refused (ACCESS_REFUSED: user or password; NOT_ALLOWED:
 * the vhost does not exist or the user may not use it): CV_ECONFIG, the user
 * and vhost named in a->base.err. Returns 0 when r is not such a refusal. */
static int login_refused(struct amqp_broker *a, amqp_rpc_reply_t r, const char *vhost) {
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_t *m = r.reply.decoded;
        if (m->reply_code == AMQP_ACCESS_REFUSED || m->reply_code == AMQP_NOT_ALLOWED)
            return broker_fail(&a->base, CV_ECONFIG, "login refused for user '%s' on vhost '%s': %.*s", a->info.user,
                               vhost, (int)m->reply_text.len, (char *)m->reply_text.bytes);
    }
    return 0;
}

/* Logs in on the open connection c. Returns 0, or a class with the reason
 * in a->base.err, naming the broker, with a hint when the connection broke at
 * once: plain AMQP spoken to a TLS port, or a TLS server that wants a client
 * certificate (TLS 1.3 refuses it after the handshake, on the first read). */
static int login(struct amqp_broker *a, amqp_connection_state_t c) {
    const char *vhost = a->info.vhost && *a->info.vhost ? a->info.vhost : "/";
    /* heartbeats at half the reply timeout: librabbitmq gives up after two missed ones */
    int heartbeat_s = (a->base.cfg->broker_reply_timeout_ms + 1999) / 2000;
    amqp_rpc_reply_t r = amqp_login(c, vhost, 0, 131072, heartbeat_s, AMQP_SASL_METHOD_PLAIN, a->info.user,
                                    a->info.password);
    char what[300];
    snprintf(what, sizeof what, "%s:%d login", a->info.host, a->info.port);
    int rc = login_refused(a, r, vhost);
    /* TLS 1.3: the server checks our certificate after the handshake; its alert comes on the first read */
    bool tls_error = a->info.ssl && r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
                     r.library_error == AMQP_STATUS_SSL_ERROR;
    if (rc == 0 && tls_error) rc = cert_refused(a);
    if (rc < 0) return rc;
    a->tls_unclear = tls_error; /* a reset that overtook the server's alert, say: open_node tries again */
    rc = rpc_check(a, r, what);
    const char *hint = NULL;
    if (rc < 0 && r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
        if (a->info.ssl && r.library_error == AMQP_STATUS_SSL_ERROR)
            hint = " (TLS: the server refused the client certificate or wants one: rabbitmq.cert_file and key_file)";
        else if (!a->info.ssl && r.library_error == AMQP_STATUS_SOCKET_ERROR)
            hint = " (is the port TLS? then the URL is amqps://)";
    }
    if (hint) {
        size_t n = strlen(a->base.err);
        snprintf(a->base.err + n, sizeof a->base.err - n, "%s", hint);
    }
    return rc;
}

/* The node of rabbitmq.url this process reached last: where the next connection
 * starts (at first the first; silent_node moves it on). Declared above. */

/* Makes node i of rabbitmq.url the one a->info describes. Returns 0, or
 * CV_ECONFIG with the reason in a->base.err (cfg_load checked the list already). */
static int select_node(struct amqp_broker *a, int i) {
    char item[1024];
    free(a->url);
    a->url = NULL;
    amqp_default_connection_info(&a->info);
    if (!url_list_item(a->base.cfg->rabbitmq_url, i, item, sizeof item))
        return broker_fail(&a->base, CV_ECONFIG, "bad RabbitMQ URL: no node %d in the list", i + 1);
    a->url = xstrdup(item);
    char why[512];
    if (url_check(URL_AMQP, item, why, sizeof why) < 0 || amqp_parse_url(a->url, &a->info) != AMQP_STATUS_OK)
        return broker_fail(&a->base, CV_ECONFIG, "bad RabbitMQ URL%s: %s", a->nurls > 1 ? " in the list" : "", why);
    a->url_at = i;
    return 0;
}

static int open_node(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms);
static int open_node_once(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms, bool listen_first);

/* Opens a connection with channel 1 (in confirm mode when confirms), unless
 * *out is open already (the publish connection, idle for long, is probed
 * first: probe_idle): to the current node, else to the next ones of the list in turn (a node that refuses
 * the login or the certificate refuses them for all: CV_ECONFIG at once).
 * Returns 0, or the class of the last failure with its reason in a->base.err. */
static int probe_idle(struct amqp_broker *a);

static int open_conn(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms) {
    if (*out == a->publish && *out) { /* idle since long: does its node still answer? (probe_idle) */
        int rc = probe_idle(a);
        if (rc < 0) return rc;
    }
    if (*out) return 0;
    int rc = open_node(a, out, confirms);
    for (int k = 1; rc < 0 && rc != CV_ECONFIG && k < a->nurls; k++) {
        char why[sizeof a->base.err];
        snprintf(why, sizeof why, "%s", a->base.err);
        int next = (a->url_at + 1) % a->nurls;
        if ((rc = select_node(a, next)) < 0) break;
        log_warn("%s; trying node %d of %d (%s:%d)", why, next + 1, a->nurls, a->info.host, a->info.port);
        rc = open_node(a, out, confirms);
    }
    if (rc < 0 && rc != CV_ECONFIG && a->nurls > 1) { /* say that every node was tried */
        char why[sizeof a->base.err];
        snprintf(why, sizeof why, "%s", a->base.err);
        broker_fail(&a->base, rc, "no RabbitMQ node of the %d listed could be reached (the last: %s)", a->nurls, why);
    }
    if (rc == 0) node_last_good = a->url_at;
    return rc;
}

/* open_conn on the current node only. */
static int open_node(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms) {
    /* A server that refuses our certificate after a TLS 1.3 handshake sends its
     * alert and closes; the protocol header we write at once may meet the reset
     * that follows, and the write fails without the alert's reason. Then once
     * more, listening first: the alert is read before we write (a configuration
     * error, not an outage). */
    int rc = open_node_once(a, out, confirms, false);
    if (rc < 0 && a->tls_unclear) {
        log_debug("%s; trying once more, listening for a TLS alert first", a->base.err);
        rc = open_node_once(a, out, confirms, true);
    }
    return rc;
}

/* The longest open_node_once waits, listening first, for an alert of a server
 * that refuses our certificate (a server that takes it says nothing until the
 * protocol header comes). */
#define LISTEN_FIRST_MS 1000

/* After the TLS handshake of socket s and before anything is written: if the
 * server has spoken (within wait_ms; AMQP servers speak only after our header,
 * so it is an alert or a close), reads it, and returns cert_refused's answer
 * (CV_ECONFIG with the reason in a->base.err when it refused our certificate);
 * else 0. */
static int heard_alert(struct amqp_broker *a, amqp_socket_t *s, int wait_ms) {
    struct pollfd p = {amqp_socket_get_sockfd(s), POLLIN, 0};
    int n;
    while ((n = poll(&p, 1, wait_ms)) < 0 && errno == EINTR) {}
    if (n <= 0 || !handshake_ssl) return 0;
    char ch;
    ERR_clear_error();
    if (SSL_peek(handshake_ssl, &ch, 1) > 0) return 0;
    return cert_refused(a);
}

/* open_node, one try; after a TLS handshake, a look for an alert already there,
 * and with listen_first a wait of up to LISTEN_FIRST_MS for one, before it logs in. */
static int open_node_once(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms, bool listen_first) {
    a->tls_unclear = false;
    amqp_connection_state_t c = amqp_new_connection();
    amqp_socket_t *s = NULL;
    int rc = new_socket(a, c, &s);
    if (rc < 0) {
        amqp_destroy_connection(c);
        return rc;
    }
    int t_ms = a->base.cfg->broker_reply_timeout_ms;
    struct timeval reply = {t_ms / 1000, (t_ms % 1000) * 1000};
    amqp_set_handshake_timeout(c, &reply); /* the login; then every RPC (the connection is closed when one fires) */
    amqp_set_rpc_timeout(c, &reply);
    struct timeval tv = {t_ms < 5000 ? t_ms / 1000 : 5, t_ms < 5000 ? (t_ms % 1000) * 1000 : 0};
    handshake_ssl = NULL;
    if ((rc = amqp_socket_open_noblock(s, a->info.host, a->info.port, &tv)) != AMQP_STATUS_OK) {
        rc = open_failed(a, rc); /* before the destroy: it reads the handshake's TLS error */
        amqp_destroy_connection(c);
        return rc;
    }
    if (a->info.ssl && (rc = heard_alert(a, s, listen_first ? LISTEN_FIRST_MS : 0)) < 0) {
        amqp_destroy_connection(c);
        return rc;
    }
    if ((rc = login(a, c)) < 0) {
        amqp_destroy_connection(c);
        return rc;
    }
    amqp_channel_open(c, CHANNEL);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(c), "channel.open")) < 0) {
        drop(&c);
        return rc;
    }
    if (confirms) {
        amqp_confirm_select(c, CHANNEL);
        if ((rc = rpc_check(a, amqp_get_rpc_reply(c), "confirm.select")) < 0) {
            drop(&c);
            return rc;
        }
        a->publish_tag = 0;
        a->probe_open = false;
        a->publish_heard_ms = clock_mono_ms();
    }
    *out = c;
    return 0;
}

static void amqp_close_broker(struct broker *b) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    broker_note(BROKER_IDLE, 0);
    send_held_ack(a);
    drop_consume(a);
    drop(&a->publish);
    free(a->url);
    free(a);
}

/* One message to publish with confirms. */
struct amqp_msg {
    const char *exchange, *routing_key;
    const void *body;
    size_t len;
    const char *message_id, *type;
    amqp_table_t headers;
    const char *expiration;    /* per-message TTL in ms, or NULL */
};

/* A publish connection idle for longer than this is probed before it is used (probe_idle). */
#define PROBE_IDLE_MS 2000
/* ... and dropped when its node does not answer the probe within this (at most broker.reply_timeout_ms). */
#define PROBE_TIMEOUT_MS 2000

/* Before a publish: when the publish connection has not heard from its node
 * for over PROBE_IDLE_MS (the node may have gone silent meanwhile, unseen: a
 * relay idle while the workers moved on; librabbitmq reads heartbeats only
 * inside its calls), asks it something (a passive declare of amq.direct) with
 * a timeout of PROBE_TIMEOUT_MS; a node that does not answer is silent
 * (silent_node: the connection is dropped and the next node is the one
 * open_conn tries). Returns 0 (the connection answered, or is gone: open_conn
 * opens another), or a class when the node refused the probe (the connection
 * is dropped). */
static int probe_idle(struct amqp_broker *a) {
    if (!a->publish || clock_mono_ms() - a->publish_heard_ms <= PROBE_IDLE_MS) return 0;
    int t_ms = a->base.cfg->broker_reply_timeout_ms < PROBE_TIMEOUT_MS ? a->base.cfg->broker_reply_timeout_ms
                                                                       : PROBE_TIMEOUT_MS;
    struct timeval probe = {t_ms / 1000, (t_ms % 1000) * 1000};
    struct timeval reply = {a->base.cfg->broker_reply_timeout_ms / 1000, (a->base.cfg->broker_reply_timeout_ms % 1000) * 1000};
    amqp_set_rpc_timeout(a->publish, &probe);
    amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes("amq.direct"), amqp_cstring_bytes("direct"), 1, 0,
                          0, 0, amqp_empty_table);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(a->publish);
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
        (r.library_error == AMQP_STATUS_TIMEOUT || r.library_error == AMQP_STATUS_HEARTBEAT_TIMEOUT)) {
        silent_node(a, "rabbitmq %s:%d: an idle connection did not answer within %d ms", a->info.host, a->info.port,
                    t_ms);
        drop_silent(&a->publish);
        return 0;
    }
    int rc = rpc_check(a, r, "probing an idle connection");
    if (rc < 0) {
        drop(&a->publish); /* broken or refused: open_conn opens another, or says why */
        return rc == CV_ERETRY ? 0 : rc;
    }
    amqp_set_rpc_timeout(a->publish, &reply);
    a->publish_heard_ms = clock_mono_ms();
    return 0;
}

/* Publishes msgs and waits for the broker to confirm every one. Returns 0,
 * CV_EREFUSED when one was unroutable (no queue bound: it would be again),
 * CV_ERETRY when one was nacked (the broker could not take it now, e.g. a
 * quorum queue without a leader: send it again) or the connection failed (the
 * publish connection is then dropped). */
static int publish_confirmed(struct amqp_broker *a, const struct amqp_msg *m, int n, bool mandatory) {
    if (n <= 0) return 0; /* nothing to confirm; and gcc then sees a sane size for calloc below */
    int rc = open_conn(a, &a->publish, true);
    if (rc < 0) return rc;
    amqp_connection_state_t c = a->publish;
    uint64_t first = a->publish_tag + 1;
    for (int i = 0; i < n; i++) {
        amqp_basic_properties_t p;
        memset(&p, 0, sizeof p);
        p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
        p.content_type = amqp_cstring_bytes("application/json");
        p.delivery_mode = 2; /* persistent */
        if (m[i].message_id) { p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG; p.message_id = amqp_cstring_bytes(m[i].message_id); }
        if (m[i].type) { p._flags |= AMQP_BASIC_TYPE_FLAG; p.type = amqp_cstring_bytes(m[i].type); }
        if (m[i].headers.num_entries) { p._flags |= AMQP_BASIC_HEADERS_FLAG; p.headers = m[i].headers; }
        if (m[i].expiration) { p._flags |= AMQP_BASIC_EXPIRATION_FLAG; p.expiration = amqp_cstring_bytes(m[i].expiration); }
        amqp_bytes_t body = {m[i].len, (void *)m[i].body};
        rc = amqp_basic_publish(c, CHANNEL, amqp_cstring_bytes(m[i].exchange), amqp_cstring_bytes(m[i].routing_key),
                                mandatory, 0, &p, body);
        if (rc == AMQP_STATUS_HEARTBEAT_TIMEOUT || rc == AMQP_STATUS_TIMEOUT) {
            rc = silent_node(a, "rabbitmq publish: %s", amqp_error_string2(rc));
            drop_silent(&a->publish);
            return rc;
        }
        if (rc != AMQP_STATUS_OK) {
            drop(&a->publish);
            return broker_fail(&a->base, CV_ERETRY, "rabbitmq publish: %s", amqp_error_string2(rc));
        }
        a->publish_tag++;
    }
    bool *done = calloc((size_t)n, sizeof *done);
    if (!done) {
        drop(&a->publish); /* its confirms would answer the next publish */
        return broker_fail(&a->base, CV_ERETRY, "rabbitmq: no memory to wait for confirms");
    }
    int left = n;
    const char *returned = NULL;
    char returned_key[256] = "";
    /* the confirm deadline: every confirm within broker.reply_timeout_ms of the last publish */
    int64_t deadline = clock_mono_ms() + a->base.cfg->broker_reply_timeout_ms;
    bool silent = false;
    broker_note(BROKER_WAITING, 0);
    while (left > 0) {
        amqp_frame_t f;
        int64_t wait_ms = deadline - clock_mono_ms();
        if (wait_ms < 0) wait_ms = 0;
        struct timeval tv = {wait_ms / 1000, (wait_ms % 1000) * 1000};
        amqp_maybe_release_buffers(c);
        rc = amqp_simple_wait_frame_noblock(c, &f, &tv);
        if (rc == AMQP_STATUS_TIMEOUT || rc == AMQP_STATUS_HEARTBEAT_TIMEOUT) {
            rc = silent_node(a, "rabbitmq %s:%d: %d of %d confirms not in %d ms (%s)", a->info.host, a->info.port, left,
                             n, a->base.cfg->broker_reply_timeout_ms, amqp_error_string2(rc));
            silent = true;
            break;
        }
        if (rc != AMQP_STATUS_OK) {
            rc = broker_fail(&a->base, CV_ERETRY, "rabbitmq waiting for confirms: %s", amqp_error_string2(rc));
            break;
        }
        if (f.frame_type != AMQP_FRAME_METHOD) continue;
        amqp_method_number_t id = f.payload.method.id;
        if (id == AMQP_BASIC_ACK_METHOD || id == AMQP_BASIC_NACK_METHOD) {
            uint64_t tag;
            bool multiple;
            if (id == AMQP_BASIC_ACK_METHOD) {
                amqp_basic_ack_t *ack = f.payload.method.decoded;
                tag = ack->delivery_tag; multiple = ack->multiple;
            } else {
                amqp_basic_nack_t *nack = f.payload.method.decoded;
                tag = nack->delivery_tag; multiple = nack->multiple;
                returned = "refused (basic.nack)";
            }
            for (uint64_t t = multiple ? first : tag; t <= tag; t++) {
                if (t < first || t >= first + (uint64_t)n || done[t - first]) continue;
                done[t - first] = true;
                left--;
            }
        } else if (id == AMQP_BASIC_RETURN_METHOD) {
            amqp_basic_return_t *ret = f.payload.method.decoded;
            snprintf(returned_key, sizeof returned_key, "%.*s", (int)ret->routing_key.len, (char *)ret->routing_key.bytes);
            returned = "unroutable";
            amqp_message_t msg;
            amqp_rpc_reply_t r = amqp_read_message(c, CHANNEL, &msg, 0);
            if (r.reply_type != AMQP_RESPONSE_NORMAL) {
                rc = broker_fail(&a->base, CV_ERETRY, "rabbitmq: cannot read a returned message");
                break;
            }
            amqp_destroy_message(&msg);
        } else if (id == AMQP_CHANNEL_CLOSE_METHOD || id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_channel_close_t *m2 = f.payload.method.decoded; /* same layout for both */
            rc = broker_fail(&a->base, id == AMQP_CHANNEL_CLOSE_METHOD ? CV_EREFUSED : CV_ERETRY,
                             "rabbitmq closed the channel: %.*s", (int)m2->reply_text.len,
                             (char *)m2->reply_text.bytes);
            break;
        }
    }
    free(done);
    if (left > 0) {
        if (silent) drop_silent(&a->publish);
        else drop(&a->publish);
        return rc < 0 ? rc : CV_ERETRY;
    }
    broker_note(BROKER_ANSWERED, 0);
    a->publish_heard_ms = clock_mono_ms();
    if (returned) {
        if (returned_key[0])
            return broker_fail(&a->base, CV_EREFUSED, "rabbitmq returned the message: no queue is bound for '%s'",
                               returned_key);
        return broker_fail(&a->base, CV_ERETRY, "rabbitmq %s the message: not taken now", returned);
    }
    return 0;
}

static int declare_queue(struct amqp_broker *a, const char *name, bool quorum) {
    amqp_table_entry_t e = {amqp_cstring_bytes("x-queue-type"), {AMQP_FIELD_KIND_UTF8, {0}}};
    e.value.value.bytes = amqp_cstring_bytes(quorum ? "quorum" : "classic");
    amqp_table_t args = {1, &e};
    amqp_queue_declare(a->publish, CHANNEL, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
    char what[300];
    snprintf(what, sizeof what, "declaring queue %s", name);
    return rpc_check(a, amqp_get_rpc_reply(a->publish), what);
}

static int amqp_declare(struct broker *b) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    int rc = open_conn(a, &a->publish, true);
    if (rc < 0) return rc;
    amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes(a->commands_ex), amqp_cstring_bytes("direct"),
                          0, 1, 0, 0, amqp_empty_table);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->publish), "declaring the commands exchange")) < 0) goto out;
    amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes(a->events_ex), amqp_cstring_bytes("topic"),
                          0, 1, 0, 0, amqp_empty_table);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->publish), "declaring the events exchange")) < 0) goto out;
    for (int i = 0; i < b->cfg->nqueues; i++) {
        const struct cfg_queue *q = &b->cfg->queues[i];
        if (q->transport != TRANSPORT_RABBITMQ) continue;
        char name[256], dead[256];
        names_amqp_queue(b->cfg, q->name, name, sizeof name);
        names_amqp_dead(b->cfg, q->name, dead, sizeof dead);
        if ((rc = declare_queue(a, name, q->quorum)) < 0 || (rc = declare_queue(a, dead, q->quorum)) < 0) goto out;
        for (int j = 0; j < q->ncommands; j++) {
            amqp_queue_bind(a->publish, CHANNEL, amqp_cstring_bytes(name), amqp_cstring_bytes(a->commands_ex),
                            amqp_cstring_bytes(q->commands[j]), amqp_empty_table);
            if ((rc = rpc_check(a, amqp_get_rpc_reply(a->publish), "binding a command type")) < 0) goto out;
        }
    }
out:
    if (rc < 0) drop(&a->publish);
    return rc;
}

static int amqp_publish_commands(struct broker *b, const struct outgoing_command *c, int n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    struct amqp_msg *m = calloc((size_t)n, sizeof *m);
    if (!m) return broker_fail(b, CV_ERETRY, "rabbitmq: out of memory");
    for (int i = 0; i < n; i++)
        m[i] = (struct amqp_msg){a->commands_ex, c[i].type, c[i].body, c[i].len, c[i].message_id, c[i].type,
                                 amqp_empty_table, NULL};
    int rc = publish_confirmed(a, m, n, true);
    free(m);
    return rc;
}

static int amqp_consume(struct broker *b, const struct cfg_queue *q, const char *worker_id) {
    (void)worker_id;
    struct amqp_broker *a = (struct amqp_broker *)b;
    names_amqp_queue(b->cfg, q->name, a->queue, sizeof a->queue);
    names_amqp_dead(b->cfg, q->name, a->dead, sizeof a->dead);
    a->prefetch = q->prefetch > q->batch_size ? q->prefetch : q->batch_size; /* a batch is what is delivered */
    a->consuming = true;
    return 0; /* basic.consume is sent when the consume connection opens */
}

static int start_consuming(struct amqp_broker *a) {
    if (a->consume) return 0;
    int rc = open_conn(a, &a->consume, false);
    if (rc < 0) return rc;
    amqp_basic_qos(a->consume, CHANNEL, 0, (uint16_t)a->prefetch, 0);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->consume), "basic.qos")) < 0) goto fail;
    amqp_basic_consume(a->consume, CHANNEL, amqp_cstring_bytes(a->queue), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->consume), "basic.consume")) < 0) goto fail;
    return 0;
fail:
    drop_consume(a);
    return rc;
}

/* Reads one delivery from the consume connection: 1, 0 on timeout, <0 on error. */
static int read_delivery(struct amqp_broker *a, amqp_envelope_t *env, int timeout_ms) {
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    for (;;) {
        amqp_maybe_release_buffers(a->consume);
        amqp_rpc_reply_t r = amqp_consume_message(a->consume, env, &tv, 0);
        if (r.reply_type == AMQP_RESPONSE_NORMAL) {
            broker_note(BROKER_ANSWERED, 0);
            return 1;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT) return 0;
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_HEARTBEAT_TIMEOUT) {
            silent_node(a, "rabbitmq %s:%d: no heartbeat while consuming (%s)", a->info.host, a->info.port,
                        amqp_error_string2(r.library_error));
            drop(&a->consume); /* librabbitmq closed the socket already: no handshake is tried */
            a->ack_held = 0;
            a->ack_held_n = 0;
            return CV_ERETRY;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
            amqp_frame_t f;
            if (amqp_simple_wait_frame(a->consume, &f) != AMQP_STATUS_OK) break;
            if (f.frame_type == AMQP_FRAME_METHOD &&
                (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
                 f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD ||
                 f.payload.method.id == AMQP_BASIC_CANCEL_METHOD)) {
                amqp_channel_close_t *m = f.payload.method.decoded;
                broker_fail(&a->base, CV_ERETRY, "rabbitmq closed the consumer: %.*s",
                            f.payload.method.id == AMQP_BASIC_CANCEL_METHOD ? 9 : (int)m->reply_text.len,
                            f.payload.method.id == AMQP_BASIC_CANCEL_METHOD ? "cancelled" : (char *)m->reply_text.bytes);
                drop_consume(a);
                return CV_ERETRY;
            }
            continue;
        }
        break;
    }
    broker_fail(&a->base, CV_ERETRY, "rabbitmq: connection lost while consuming");
    drop_consume(a);
    return CV_ERETRY;
}

/* The entry named key of a header table (h may be NULL), or NULL. */
static amqp_table_entry_t *find_header(amqp_table_t *h, const char *key) {
    for (int i = 0; h && i < h->num_entries; i++)
        if (h->entries[i].key.len == strlen(key) && memcmp(h->entries[i].key.bytes, key, h->entries[i].key.len) == 0)
            return &h->entries[i];
    return NULL;
}

/* A header as a string (NULL if absent or not a string; the caller frees it); h may be NULL. */
static char *header_str(amqp_table_t *h, const char *key) {
    amqp_table_entry_t *e = find_header(h, key);
    if (e && (e->value.kind == AMQP_FIELD_KIND_UTF8 || e->value.kind == AMQP_FIELD_KIND_BYTES))
        return copy_bytes(e->value.value.bytes);
    return NULL;
}

static int amqp_next(struct broker *b, struct delivery *d, int timeout_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    memset(d, 0, sizeof *d);
    /* the held ack goes before the consumer waits (amqp_ack_batch sends it
     * sooner once it covers half the prefetch) */
    if (a->ack_held && timeout_ms > 0) send_held_ack(a);
    int rc = start_consuming(a);
    if (rc < 0) return rc;
    amqp_envelope_t env;
    if ((rc = read_delivery(a, &env, timeout_ms)) <= 0) return rc;
    d->len = env.message.body.len;
    d->body = copy_bytes(env.message.body);
    if (env.message.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        amqp_bytes_t id = env.message.properties.message_id;
        d->message_id = copy_bytes(id);
        /* a NUL byte would cut it into another id: make it unusable instead */
        for (size_t i = 0; i < id.len; i++)
            if (!d->message_id[i]) d->message_id[i] = '?';
    }
    d->tag = env.delivery_tag;
    /* back after a crash or a requeue (redelivered), or from a delay queue
     * (RabbitMQ's x-death header, added when it dead-letters the message back) */
    amqp_basic_properties_t *p = &env.message.properties;
    d->redelivered = env.redelivered || ((p->_flags & AMQP_BASIC_HEADERS_FLAG) && find_header(&p->headers, "x-death"));
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) d->traceparent = header_str(&p->headers, "traceparent");
    amqp_destroy_envelope(&env);
    return 1;
}

static int amqp_ack(struct broker *b, const struct delivery *d) {
    send_ack((struct amqp_broker *)b, d->tag, false);
    return 0;
}

/* Every delivery up to the batch's last is settled: one multiple ack covers
 * them, held so that consecutive batches share it, until it covers half the
 * prefetch or the consumer is about to wait (amqp_next). */
static int amqp_ack_batch(struct broker *b, const struct delivery *d, int n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return amqp_ack(b, d); /* gone with the channel: logged, redelivered, found done */
    for (int i = 0; i < n; i++)
        if (d[i].tag > a->ack_held) a->ack_held = d[i].tag;
    a->ack_held_n += n;
    /* half the prefetch: the broker would soon stop delivering */
    if (a->ack_held_n >= (a->prefetch + 1) / 2) send_held_ack(a);
    return 0;
}

static int amqp_requeue(struct broker *b, const struct delivery *d) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return 0; /* unacked on a closed channel: already back on the queue */
    int rc = amqp_basic_nack(a->consume, CHANNEL, d->tag, 0, 1);
    if (rc != AMQP_STATUS_OK) {
        drop_consume(a);
        return broker_fail(b, CV_ERETRY, "rabbitmq nack: %s", amqp_error_string2(rc));
    }
    return 0;
}

/* Sets *e to the header traceparent = value; returns 1, or 0 when value is NULL. */
static int traceparent_header(amqp_table_entry_t *e, const char *value) {
    if (!value) return 0;
    e->key = amqp_cstring_bytes("traceparent");
    e->value.kind = AMQP_FIELD_KIND_UTF8;
    e->value.value.bytes = amqp_cstring_bytes(value);
    return 1;
}

static int amqp_dead_letter(struct broker *b, const struct delivery *d, const char *reason,
                            const char *error, int attempts, const char *dead_id) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    char ts[32];
    clock_rfc3339(clock_ms(), ts);
    amqp_table_entry_t h[6];
    h[0].key = amqp_cstring_bytes("x-conveyor-reason");
    h[0].value.kind = AMQP_FIELD_KIND_UTF8;
    h[0].value.value.bytes = amqp_cstring_bytes(reason);
    h[1].key = amqp_cstring_bytes("x-conveyor-error");
    h[1].value.kind = AMQP_FIELD_KIND_UTF8;
    h[1].value.value.bytes = amqp_cstring_bytes(error);
    h[2].key = amqp_cstring_bytes("x-conveyor-attempts");
    h[2].value.kind = AMQP_FIELD_KIND_I32;
    h[2].value.value.i32 = attempts;
    h[3].key = amqp_cstring_bytes("x-conveyor-failed-at");
    h[3].value.kind = AMQP_FIELD_KIND_UTF8;
    h[3].value.value.bytes = amqp_cstring_bytes(ts);
    /* the message's own traceparent header goes with it (a retry from the dead letters keeps its trace) */
    int nh = 4 + traceparent_header(&h[4], d->traceparent);
    if (dead_id) { /* its row in the dead-letter index (workers/dead_index.c) */
        h[nh].key = amqp_cstring_bytes("x-conveyor-dead-id");
        h[nh].value.kind = AMQP_FIELD_KIND_UTF8;
        h[nh++].value.value.bytes = amqp_cstring_bytes(dead_id);
    }
    struct amqp_msg m = {"", a->dead, d->body, d->len, d->message_id, NULL, {nh, h}, NULL};
    int rc = publish_confirmed(a, &m, 1, true);
    if (rc < 0) return rc;
    return amqp_ack(b, d);
}

/* The delay queue for delay_ms: conveyor.<q>.retry.<nominal ms>, one per
 * doubling of the base delay, so messages of one queue expire in about the
 * order they were put in (a message expires only at the head of its queue). */
static int retry_queue(struct amqp_broker *a, int delay_ms, char *name, size_t n) {
    const struct cfg *c = a->base.cfg;
    long nominal = c->retry_base_ms;
    while (nominal < delay_ms && nominal < c->retry_max_ms) nominal *= 2;
    if (nominal > c->retry_max_ms) nominal = c->retry_max_ms;
    snprintf(name, n, "%s.retry.%ld", a->queue, nominal);
    amqp_table_entry_t e[3];
    e[0].key = amqp_cstring_bytes("x-dead-letter-exchange");
    e[0].value.kind = AMQP_FIELD_KIND_UTF8;
    e[0].value.value.bytes = amqp_cstring_bytes("");
    e[1].key = amqp_cstring_bytes("x-dead-letter-routing-key");
    e[1].value.kind = AMQP_FIELD_KIND_UTF8;
    e[1].value.value.bytes = amqp_cstring_bytes(a->queue);
    e[2].key = amqp_cstring_bytes("x-queue-type");
    e[2].value.kind = AMQP_FIELD_KIND_UTF8;
    e[2].value.value.bytes = amqp_cstring_bytes("classic");
    amqp_table_t args = {3, e};
    int rc = open_conn(a, &a->publish, true);
    if (rc < 0) return rc;
    amqp_queue_declare(a->publish, CHANNEL, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->publish), "declaring a delay queue")) < 0) drop(&a->publish);
    return rc;
}

static int amqp_retry(struct broker *b, const struct delivery *d, int delay_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    char name[300], expiration[24];
    int rc = retry_queue(a, delay_ms, name, sizeof name);
    if (rc < 0) return rc;
    snprintf(expiration, sizeof expiration, "%d", delay_ms);
    amqp_table_entry_t h[1];
    struct amqp_msg m = {"", name, d->body, d->len, d->message_id, NULL,
                         {traceparent_header(&h[0], d->traceparent), h}, NULL};
    m.expiration = expiration;
    if ((rc = publish_confirmed(a, &m, 1, true)) < 0) return rc;
    return amqp_ack(b, d);
}

static int amqp_maintain(struct broker *b) { (void)b; return 0; /* RabbitMQ redelivers and expires by itself */ }

/* A header of a dead letter as its integer (0 if absent). */
static int header_int(amqp_table_t *h, const char *key) {
    amqp_table_entry_t *e = find_header(h, key);
    switch (e ? e->value.kind : 0) {
    case AMQP_FIELD_KIND_I8: return e->value.value.i8;
    case AMQP_FIELD_KIND_U8: return e->value.value.u8;
    case AMQP_FIELD_KIND_I16: return e->value.value.i16;
    case AMQP_FIELD_KIND_U16: return e->value.value.u16;
    case AMQP_FIELD_KIND_I32: return e->value.value.i32;
    case AMQP_FIELD_KIND_U32: return (int)e->value.value.u32;
    case AMQP_FIELD_KIND_I64: return (int)e->value.value.i64;
    case AMQP_FIELD_KIND_U64: return (int)e->value.value.u64;
    default: return 0;
    }
}

/* Gets every message of the dead queue of q without acking; with sel, acks
 * (after re-publishing, with requeue) the chosen ones. Closing the connection
 * then returns the others to the dead queue, in order. */
static int amqp_dead_walk(struct broker *b, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                          bool requeue, int *count, struct dead_letter **out, int *n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    char dead[256], queue[256];
    names_amqp_dead(a->base.cfg, q->name, dead, sizeof dead);
    names_amqp_queue(a->base.cfg, q->name, queue, sizeof queue);
    drop_consume(a);
    int rc = open_conn(a, &a->consume, false), cap = 0, index = 0;
    if (rc < 0) return rc;
    while (rc == 0) {
        amqp_rpc_reply_t r = amqp_basic_get(a->consume, CHANNEL, amqp_cstring_bytes(dead), 0);
        if ((rc = rpc_check(a, r, "reading the dead letters")) < 0) break;
        if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD) break;
        uint64_t tag = ((amqp_basic_get_ok_t *)r.reply.decoded)->delivery_tag;
        amqp_message_t msg;
        if ((rc = rpc_check(a, amqp_read_message(a->consume, CHANNEL, &msg, 0), "reading a dead letter")) < 0) break;
        struct dead_letter d;
        memset(&d, 0, sizeof d);
        d.len = msg.body.len;
        d.body = copy_bytes(msg.body);
        amqp_basic_properties_t *p = &msg.properties;
        amqp_table_t *h = (p->_flags & AMQP_BASIC_HEADERS_FLAG) ? &p->headers : NULL;
        if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) d.message_id = copy_bytes(p->message_id);
        d.reason = header_str(h, "x-conveyor-reason");
        d.error = header_str(h, "x-conveyor-error");
        d.failed_at = header_str(h, "x-conveyor-failed-at");
        d.attempts = header_int(h, "x-conveyor-attempts");
        d.dead_id = header_str(h, "x-conveyor-dead-id");
        char *traceparent = header_str(h, "traceparent");
        amqp_destroy_message(&msg);
        index++;
        if (sel && sel(&d, index, arg)) {
            if (requeue) {
                amqp_table_entry_t th[1];
                struct amqp_msg m = {"", queue, d.body, d.len, d.message_id, NULL,
                                     {traceparent_header(&th[0], traceparent), th}, NULL};
                if ((rc = publish_confirmed(a, &m, 1, true)) < 0) {
                    free(traceparent);
                    dead_letter_clear(&d);
                    break;
                }
            }
            if (amqp_basic_ack(a->consume, CHANNEL, tag, 0) != AMQP_STATUS_OK) {
                free(traceparent);
                rc = broker_fail(&a->base, CV_ERETRY, "rabbitmq: ack of a dead letter failed");
                dead_letter_clear(&d);
                break;
            }
            (*count)++;
        }
        free(traceparent);
        if (out) {
            if (*n == cap) *out = xrealloc(*out, (size_t)(cap = cap ? cap * 2 : 16) * sizeof **out);
            (*out)[(*n)++] = d;
        } else {
            dead_letter_clear(&d);
        }
    }
    drop_consume(a); /* the unacked ones go back to the dead queue */
    return rc;
}

#define PROBE_CHANNEL 2 /* passive declares: a 404 closes this channel, not the publish one */

/* The messages (and consumers, if not NULL) of queue name, by a passive
 * declare on a channel of its own of the publish connection. Returns 0, or a
 * class; a queue that does not exist counts 0 (RabbitMQ closes that channel:
 * it is acknowledged and opened again next time; a delay queue is declared only
 * at its first retry, so most of them do not exist). */
static int passive_count(struct amqp_broker *a, const char *name, long *messages, long *consumers) {
    int rc = open_conn(a, &a->publish, true);
    if (rc < 0) return rc;
    if (!a->probe_open) {
        amqp_channel_open(a->publish, PROBE_CHANNEL);
        if ((rc = rpc_check(a, amqp_get_rpc_reply(a->publish), "channel.open")) < 0) {
            drop(&a->publish);
            return rc;
        }
        a->probe_open = true;
    }
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(a->publish, PROBE_CHANNEL, amqp_cstring_bytes(name), 1, 0, 0, 0, amqp_empty_table);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(a->publish);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
        ((amqp_channel_close_t *)r.reply.decoded)->reply_code == AMQP_NOT_FOUND) {
        amqp_channel_close_ok_t close_ok = {0};
        a->probe_open = false;
        if (amqp_send_method(a->publish, PROBE_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &close_ok) != AMQP_STATUS_OK)
            drop(&a->publish); /* the connection is broken: the next call opens another */
        *messages = 0;
        if (consumers) *consumers = 0;
        return 0;
    }
    char what[300];
    snprintf(what, sizeof what, "reading queue %s", name);
    if ((rc = rpc_check(a, r, what)) < 0) {
        drop(&a->publish);
        return rc;
    }
    *messages = ok->message_count;
    if (consumers) *consumers = ok->consumer_count;
    return 0;
}

/* The dead letters of q: the message count of a passive declare (no message moves). */
static int amqp_dead_count(struct broker *b, const struct cfg_queue *q, long *n) {
    char dead[256];
    names_amqp_dead(b->cfg, q->name, dead, sizeof dead);
    return passive_count((struct amqp_broker *)b, dead, n, NULL);
}

/* Ready messages of the queue, its consumers, its dead letters, and the
 * messages of each delay queue the current retry settings use (retry_queue's
 * nominal delays: the base doubled while below the cap, and the cap). */
static int amqp_queue_counts(struct broker *b, const struct cfg_queue *q, struct queue_counts *out) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    const struct cfg *c = b->cfg;
    char name[256], other[300];
    names_amqp_queue(c, q->name, name, sizeof name);
    int rc = passive_count(a, name, &out->waiting, &out->consumers);
    names_amqp_dead(c, q->name, other, sizeof other);
    if (rc == 0) rc = passive_count(a, other, &out->dead, NULL);
    for (long nominal = c->retry_base_ms; rc == 0; nominal *= 2) {
        if (nominal > c->retry_max_ms) nominal = c->retry_max_ms;
        long n;
        snprintf(other, sizeof other, "%s.retry.%ld", name, nominal);
        if ((rc = passive_count(a, other, &n, NULL)) == 0) out->retrying += n;
        if (nominal >= c->retry_max_ms) break;
    }
    out->in_flight = -1; /* unacked messages: only the management plugin tells them */
    return rc;
}

static int amqp_publish_events(struct broker *b, const struct outgoing_event *ev, int n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    struct amqp_msg *m = calloc((size_t)n, sizeof *m);
    amqp_table_entry_t *h = calloc((size_t)n, sizeof *h); /* each event's traceparent header */
    if (!m || !h) {
        free(m);
        free(h);
        return broker_fail(b, CV_ERETRY, "rabbitmq: out of memory");
    }
    for (int i = 0; i < n; i++) {
        m[i].exchange = a->events_ex;
        m[i].routing_key = ev[i].type;
        m[i].body = ev[i].json;
        m[i].len = strlen(ev[i].json);
        m[i].message_id = ev[i].id;
        m[i].type = ev[i].type;
        /* an event of a traced command carries its traceparent as a header too */
        m[i].headers = (amqp_table_t){traceparent_header(&h[i], ev[i].traceparent), &h[i]};
    }
    /* not mandatory: an event nobody subscribes to is not an error */
    int rc = publish_confirmed(a, m, n, false);
    free(h);
    free(m);
    return rc;
}

static int amqp_subscribe(struct broker *b, const char *pattern) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    int rc = open_conn(a, &a->consume, false);
    if (rc < 0) return rc;
    amqp_exchange_declare(a->consume, CHANNEL, amqp_cstring_bytes(a->events_ex), amqp_cstring_bytes("topic"),
                          0, 1, 0, 0, amqp_empty_table);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->consume), "declaring the events exchange")) < 0) goto fail;
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(a->consume, CHANNEL, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->consume), "declaring a subscriber queue")) < 0) goto fail;
    amqp_bytes_t qname = amqp_bytes_malloc_dup(ok->queue);
    amqp_queue_bind(a->consume, CHANNEL, qname, amqp_cstring_bytes(a->events_ex),
                    amqp_cstring_bytes(pattern && *pattern ? pattern : "#"), amqp_empty_table);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->consume), "binding the subscriber queue")) < 0) {
        amqp_bytes_free(qname);
        goto fail;
    }
    amqp_basic_consume(a->consume, CHANNEL, qname, amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
    amqp_bytes_free(qname);
    if ((rc = rpc_check(a, amqp_get_rpc_reply(a->consume), "basic.consume")) < 0) goto fail;
    return 0;
fail:
    drop_consume(a);
    return rc;
}

static int amqp_next_event(struct broker *b, char **json, int timeout_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return broker_fail(b, CV_ERETRY, "rabbitmq: the subscription was lost");
    amqp_envelope_t env;
    int rc = read_delivery(a, &env, timeout_ms);
    if (rc <= 0) return rc;
    *json = copy_bytes(env.message.body);
    amqp_destroy_envelope(&env);
    return 1;
}

static const struct broker_ops amqp_ops = { /* no .take: broker.c takes with next, timeout 0 */
    .close = amqp_close_broker,
    .declare = amqp_declare,
    .publish_commands = amqp_publish_commands,
    .consume = amqp_consume,
    .next = amqp_next,
    .ack = amqp_ack,
    .ack_batch = amqp_ack_batch,
    .requeue = amqp_requeue,
    .dead_letter = amqp_dead_letter,
    .retry = amqp_retry,
    .maintain = amqp_maintain,
    .dead_walk = amqp_dead_walk,
    .dead_count = amqp_dead_count,
    .queue_counts = amqp_queue_counts,
    .publish_events = amqp_publish_events,
    .subscribe = amqp_subscribe,
    .next_event = amqp_next_event,
};

struct broker *broker_amqp_open(const struct cfg *cfg, int *cls, char *err, size_t errlen) {
    struct amqp_broker *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    a->base.ops = &amqp_ops;
    a->base.cfg = cfg;
    snprintf(a->commands_ex, sizeof a->commands_ex, "%s.commands", cfg->prefix);
    snprintf(a->events_ex, sizeof a->events_ex, "%s.events", cfg->prefix);
    a->nurls = url_list_count(cfg->rabbitmq_url);
    if ((*cls = select_node(a, node_last_good % a->nurls)) < 0 || (*cls = open_conn(a, &a->publish, true)) < 0) {
        snprintf(err, errlen, "%s", a->base.err);
        amqp_close_broker(&a->base);
        return NULL;
    }
    return &a->base;
}
