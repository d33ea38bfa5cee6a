/* amqp_conn.c - the RabbitMQ backend's connections (librabbitmq-c 0.11): the
 * node of the list to use, opening a connection (the socket, TLS, the login,
 * channel 1), the bounds on a silent node, RPC replies as classes. Its callers
 * are the operations (broker_amqp.c) and publishing (amqp_publish.c), through
 * amqp_internal.h; it calls neither. An amqps:// URL opens over TLS
 * (new_socket: the one place a RabbitMQ socket is made).
 *
 * rabbitmq.url may list the nodes of one cluster: a connection opens to the node
 * that last worked in this process (at first the first of the list; list them in
 * another order on each host to spread the connections); when it cannot, it moves
 * to the next node, and so on once round the list (amqp_conn_open). Command queues
 * are quorum queues (their queue_type), so every node serves them; docs/scaling.md.
 *
 * A silent node (frozen, its host cut off with the connections open) is found
 * by bounds, all from broker.reply_timeout_ms (T): heartbeats negotiated at T/2
 * (librabbitmq gives up a read or a write after two missed ones, so within T of
 * the node's last frame), every RPC and the login bounded by T
 * (amqp_set_rpc_timeout, amqp_set_handshake_timeout), a publish's confirms by
 * T. A bound that fires says so (broker_note BROKER_SILENT), drops the
 * connection without the close handshake, and moves this process to the next
 * node of the list (amqp_conn_silent), so the next open does not wait for the same
 * node again.
 */
#include "amqp_internal.h"

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* amqps:// without rabbitmq.ca_file: the system's trust store (Debian's ca-certificates) */
#define SYSTEM_CA_FILE "/etc/ssl/certs/ca-certificates.crt"

/* How long the close handshake of amqp_conn_drop may wait for the server's close-ok. */
#define CLOSE_WAIT_MS 1000

/* Closes c with the handshake, bounded by CLOSE_WAIT_MS, and destroys it; errors are ignored. */
void amqp_conn_drop(amqp_connection_state_t *c) {
    if (!*c) return;
    struct timeval tv = {CLOSE_WAIT_MS / 1000, (CLOSE_WAIT_MS % 1000) * 1000};
    amqp_set_rpc_timeout(*c, &tv); /* a silent server does not hold the close */
    amqp_connection_close(*c, AMQP_REPLY_SUCCESS); /* best effort; ignores errors */
    amqp_destroy_connection(*c);
    *c = NULL;
}

/* Drops c without the close handshake (its server is silent: nothing would answer). */
void amqp_conn_drop_silent(amqp_connection_state_t *c) {
    if (!*c) return;
    amqp_destroy_connection(*c);
    *c = NULL;
}

static int select_node(struct amqp_broker *a, int i);

/* The node of rabbitmq.url this process reached last: where the next broker of
 * this process starts (at first the first; a node found silent moves it on,
 * amqp_conn_silent), so that a process that opens its broker again (the relay
 * after a failure, the C client) does not wait for a silent node again
 * (docs/scaling.md, "What a hang costs"). One per process, as the README says
 * ("Several RabbitMQ nodes"), not one per broker: read by amqp_conn_start only,
 * written by remember_node only; atomic, as the HTTP child's threads open
 * brokers too. A broker's own node is its a->url_at. */
static _Atomic int process_node;

/* Node i is where the next broker of this process starts. */
static void remember_node(int i) { atomic_store(&process_node, i); }

/* A bound fired on a silent node (see the header): says so (broker_note), sets
 * the reason in a->base.err (fmt, with " (moving to node i of n)" when the list
 * has another), and makes the next node of the list the one the next open of
 * this process tries first. Returns CV_ERETRY. The caller drops the connection
 * (amqp_conn_drop_silent: no close handshake). */
int amqp_conn_silent(struct amqp_broker *a, const char *fmt, ...) {
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
            remember_node(next);
            snprintf(a->base.err + n, sizeof a->base.err - n, " (%s is silent: moving to node %d of %d, %s:%d)", host,
                     next + 1, a->nurls, a->info.host, a->info.port);
        }
    }
    log_warn("%s", a->base.err);
    return CV_ERETRY;
}

/* Turns an RPC reply into 0, or a class with the reason in a->base.err. A refused
 * request (channel or connection closed by the server) is CV_EREFUSED; a lost
 * connection CV_ERETRY. Either way the caller drops the connection. */
int amqp_conn_check(struct amqp_broker *a, amqp_rpc_reply_t r, const char *what) {
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return 0;
    case AMQP_RESPONSE_NONE: return broker_fail(&a->base, CV_ERETRY, "rabbitmq %s: missing reply", what);
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        if (r.library_error == AMQP_STATUS_TIMEOUT || r.library_error == AMQP_STATUS_HEARTBEAT_TIMEOUT)
            return amqp_conn_silent(a, "rabbitmq %s: no reply within %d ms (%s)", what,
                                    a->base.cfg->broker_reply_timeout_ms, amqp_error_string2(r.library_error));
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
    rc = amqp_conn_check(a, r, what);
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

/* The node list counted, and the node this process reached last selected. */
int amqp_conn_start(struct amqp_broker *a) {
    a->nurls = url_list_count(a->base.cfg->rabbitmq_url);
    return select_node(a, atomic_load(&process_node) % a->nurls);
}

static int open_node(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms);
static int open_node_once(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms, bool listen_first);
static int probe_idle(struct amqp_broker *a);

/* Opens a connection with channel 1 (in confirm mode when confirms), unless
 * *out is open already (the publish connection, idle for long, is probed
 * first: probe_idle): to the current node, else to the next ones of the list in turn (a node that refuses
 * the login or the certificate refuses them for all: CV_ECONFIG at once).
 * Returns 0, or the class of the last failure with its reason in a->base.err. */
int amqp_conn_open(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms) {
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
    if (rc == 0) remember_node(a->url_at);
    return rc;
}

/* amqp_conn_open on the current node only. */
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
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(c), "channel.open")) < 0) {
        amqp_conn_drop(&c);
        return rc;
    }
    if (confirms) {
        amqp_confirm_select(c, CHANNEL);
        if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(c), "confirm.select")) < 0) {
            amqp_conn_drop(&c);
            return rc;
        }
        a->publish_tag = 0;
        a->probe_open = false;
        a->publish_heard_ms = clock_mono_ms();
    }
    *out = c;
    return 0;
}

/* A publish connection idle for longer than this is probed before it is used (probe_idle). */
#define PROBE_IDLE_MS 2000
/* ... and dropped when its node does not answer the probe within this (at most broker.reply_timeout_ms). */
#define PROBE_TIMEOUT_MS 2000

/* Before a publish: when the publish connection has not heard from its node
 * for over PROBE_IDLE_MS (the node may have gone silent meanwhile, unseen: a
 * relay idle while the workers moved on; librabbitmq reads heartbeats only
 * inside its calls), asks it something (a passive declare of amq.direct) with
 * a timeout of PROBE_TIMEOUT_MS; a node that does not answer is silent
 * (amqp_conn_silent: the connection is dropped and the next node is the one
 * amqp_conn_open tries). Returns 0 (the connection answered, or is gone:
 * amqp_conn_open opens another), or a class when the node refused the probe
 * (the connection is dropped). */
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
        amqp_conn_silent(a, "rabbitmq %s:%d: an idle connection did not answer within %d ms", a->info.host,
                         a->info.port, t_ms);
        amqp_conn_drop_silent(&a->publish);
        return 0;
    }
    int rc = amqp_conn_check(a, r, "probing an idle connection");
    if (rc < 0) {
        amqp_conn_drop(&a->publish); /* broken or refused: amqp_conn_open opens another, or says why */
        return rc == CV_ERETRY ? 0 : rc;
    }
    amqp_set_rpc_timeout(a->publish, &reply);
    a->publish_heard_ms = clock_mono_ms();
    return 0;
}
