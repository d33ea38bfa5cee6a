/* queue_limits.c - bounded queues on RabbitMQ: the max-length policies that
 * conveyor-workers sets at start through the management plugin's HTTP API
 * (rabbitmq.management_url), with libcurl. AMQP cannot set a policy, and a
 * queue argument cannot change on a queue that exists (406): a policy can.
 *
 * One policy per bounded queue, named <queue>.max-length (conveyor.orders.max-length),
 * pattern ^<queue>$ (the name's dots escaped), apply-to queues, definition
 * {max-length, overflow: reject-publish}. RabbitMQ applies one policy to a
 * queue, the one of highest priority: so when an operator's policy matches the
 * queue too, Conveyor's copies its definition (its other keys: HA, delivery
 * limit, ...), adds the limit, and takes its priority plus one, so that the
 * operator's settings still hold on that queue (docs/decisions.md, "Bounded
 * queues"). A queue whose max_length is 0 has its policy deleted. */
#include "workers.h"

#include <curl/curl.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <amqp.h>

/* A reply's body, grown as it comes. */
struct body {
    char *text;
    size_t len;
};

static size_t keep(char *p, size_t size, size_t n, void *arg) {
    struct body *b = arg;
    b->text = xrealloc(b->text, b->len + size * n + 1);
    memcpy(b->text + b->len, p, size * n);
    b->len += size * n;
    b->text[b->len] = '\0';
    return size * n;
}

/* One request: method on base + path with json (may be NULL) as its body.
 * Returns the HTTP status (>= 100) with the body in *out (the caller frees it;
 * may be NULL), or CV_ERETRY when the API could not be reached, with why. */
static int request(const struct cfg *cfg, const char *method, const char *path, const char *json, char **out,
                   char *err, size_t errlen) {
    CURL *h = curl_easy_init();
    if (!h) return snprintf(err, errlen, "libcurl cannot start"), CV_ERETRY;
    char url[1024];
    snprintf(url, sizeof url, "%s%s", cfg->rabbitmq_management_url, path);
    struct body b = {NULL, 0};
    struct curl_slist *hdr = curl_slist_append(NULL, "content-type: application/json");
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, keep);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)cfg->broker_reply_timeout_ms);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    if (json) curl_easy_setopt(h, CURLOPT_POSTFIELDS, json);
    CURLcode cc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdr);
    curl_easy_cleanup(h);
    if (cc != CURLE_OK) {
        free(b.text);
        snprintf(err, errlen, "%s %s: %s", method, path, curl_easy_strerror(cc));
        return CV_ERETRY;
    }
    if (out) *out = b.text;
    else free(b.text);
    return (int)status;
}

/* A status that is not 2xx as a class, with why: 401/403 CV_ECONFIG (the
 * credentials), 5xx CV_ERETRY, any other CV_EREFUSED. */
static int status_class(int status, const char *what, const char *body, char *err, size_t errlen) {
    snprintf(err, errlen, "%s: HTTP %d %.200s", what, status, body ? body : "");
    return status == 401 || status == 403 ? CV_ECONFIG : status >= 500 ? CV_ERETRY : CV_EREFUSED;
}

/* ^name$ with every character that regular expressions read escaped. */
static void anchored(const char *name, char *out, size_t n) {
    size_t k = 0;
    if (k + 1 < n) out[k++] = '^';
    for (const char *p = name; *p && k + 3 < n; p++) {
        if (strchr(".^$*+?()[]{}|\\", *p)) out[k++] = '\\';
        out[k++] = *p;
    }
    if (k + 1 < n) out[k++] = '$';
    out[k] = '\0';
}

/* The operator's policy of highest priority (not one named `ours`) that applies
 * to queue `name` in the list of /api/policies, or NULL (borrowed from list).
 * The patterns are Erlang regular expressions, read here as POSIX extended
 * ones (the same for the usual ones; a pattern that does not compile is
 * passed over, with a warning). */
static const cJSON *operator_policy(const cJSON *list, const char *name, const char *ours) {
    const cJSON *best = NULL, *p;
    cJSON_ArrayForEach(p, list) {
        const cJSON *pn = cJSON_GetObjectItemCaseSensitive(p, "name"), *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const cJSON *to = cJSON_GetObjectItemCaseSensitive(p, "apply-to"), *prio = cJSON_GetObjectItemCaseSensitive(p, "priority");
        if (!cJSON_IsString(pn) || !cJSON_IsString(pat) || !cJSON_IsNumber(prio) || strcmp(pn->valuestring, ours) == 0) continue;
        if (cJSON_IsString(to) && strcmp(to->valuestring, "queues") != 0 && strcmp(to->valuestring, "all") != 0) continue;
        regex_t re;
        if (regcomp(&re, pat->valuestring, REG_EXTENDED | REG_NOSUB) != 0) {
            log_warn("policy %s: pattern '%s' is not read here; it is not merged into %s", pn->valuestring,
                     pat->valuestring, ours);
            continue;
        }
        bool match = regexec(&re, name, 0, NULL, 0) == 0;
        regfree(&re);
        if (match && (!best || prio->valuedouble > cJSON_GetObjectItemCaseSensitive(best, "priority")->valuedouble))
            best = p;
    }
    return best;
}

/* PUTs the policy of bounded queue q (list: the vhost's policies). Returns 0 or a class. */
static int put_policy(const struct cfg *cfg, const struct cfg_queue *q, const char *vhost, const cJSON *list,
                      char *err, size_t errlen) {
    char name[256], policy[300], pattern[600], path[1024];
    names_amqp_queue(cfg, q->name, name, sizeof name);
    snprintf(policy, sizeof policy, "%s.max-length", name);
    anchored(name, pattern, sizeof pattern);
    const cJSON *op = operator_policy(list, name, policy);
    cJSON *def = op ? cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(op, "definition"), true) : NULL;
    if (!cJSON_IsObject(def)) {
        cJSON_Delete(def);
        def = cJSON_CreateObject();
    }
    cJSON_DeleteItemFromObjectCaseSensitive(def, "max-length");
    cJSON_DeleteItemFromObjectCaseSensitive(def, "overflow");
    cJSON_AddNumberToObject(def, "max-length", (double)q->max_length);
    cJSON_AddStringToObject(def, "overflow", "reject-publish");
    int priority = op ? (int)cJSON_GetObjectItemCaseSensitive(op, "priority")->valuedouble + 1 : 0;
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "pattern", pattern);
    cJSON_AddStringToObject(body, "apply-to", "queues");
    cJSON_AddNumberToObject(body, "priority", priority);
    cJSON_AddItemToObject(body, "definition", def);
    char *json = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    snprintf(path, sizeof path, "/api/policies/%s/%s", vhost, policy);
    char *reply = NULL;
    int st = request(cfg, "PUT", path, json, &reply, err, errlen);
    free(json);
    int rc = st < 0 ? st : st / 100 == 2 ? 0 : status_class(st, "setting a policy", reply, err, errlen);
    free(reply);
    if (rc == 0)
        log_info("queue %s bounded at %ld waiting commands (policy %s, priority %d%s%s)", name, q->max_length, policy,
                 priority, op ? ", with the definition of the operator's policy " : "",
                 op ? cJSON_GetObjectItemCaseSensitive(op, "name")->valuestring : "");
    return rc;
}

/* Deletes the policy of queue q, which has no max_length (none there is fine). */
static int delete_policy(const struct cfg *cfg, const struct cfg_queue *q, const char *vhost, char *err,
                         size_t errlen) {
    char name[256], path[1024];
    names_amqp_queue(cfg, q->name, name, sizeof name);
    snprintf(path, sizeof path, "/api/policies/%s/%s.max-length", vhost, name);
    char *reply = NULL;
    int st = request(cfg, "DELETE", path, NULL, &reply, err, errlen);
    int rc = st < 0 ? st : st / 100 == 2 || st == 404 ? 0 : status_class(st, "deleting a policy", reply, err, errlen);
    free(reply);
    return rc;
}

/* The vhost of the first RabbitMQ URL, escaped for a path ("%2F" for "/"). */
static void url_vhost(const struct cfg *cfg, char *out, size_t n) {
    char url[1024];
    struct amqp_connection_info info;
    const char *v = "/";
    if (url_list_item(cfg->rabbitmq_url, 0, url, sizeof url) && amqp_parse_url(url, &info) == AMQP_STATUS_OK)
        v = info.vhost;
    char *e = curl_easy_escape(NULL, v, 0);
    snprintf(out, n, "%s", e ? e : "%2F");
    curl_free(e);
}

int queue_limits_apply(const struct cfg *cfg, char *err, size_t errlen) {
    bool bounded = false;
    for (int i = 0; i < cfg->nqueues; i++)
        bounded = bounded || (cfg->queues[i].transport == TRANSPORT_RABBITMQ && cfg->queues[i].max_length > 0);
    if (!cfg->rabbitmq_management_url || !*cfg->rabbitmq_management_url) {
        if (!bounded) return 0;
        snprintf(err, errlen, "a RabbitMQ queue has max_length, but rabbitmq.management_url "
                              "(CONVEYOR_RABBITMQ_MANAGEMENT_URL) is not set: Conveyor sets the limit as a policy there");
        return CV_ECONFIG;
    }
    char vhost[512], path[600];
    url_vhost(cfg, vhost, sizeof vhost);
    snprintf(path, sizeof path, "/api/policies/%s", vhost);
    char *reply = NULL;
    int st = request(cfg, "GET", path, NULL, &reply, err, errlen);
    int rc = st < 0 ? st : st / 100 == 2 ? 0 : status_class(st, "reading the policies", reply, err, errlen);
    cJSON *list = rc == 0 ? cJSON_Parse(reply) : NULL;
    free(reply);
    if (rc == 0 && !cJSON_IsArray(list)) rc = status_class(st, "reading the policies: not a JSON array", NULL, err, errlen);
    for (int i = 0; rc == 0 && i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        if (q->transport != TRANSPORT_RABBITMQ) continue;
        rc = q->max_length > 0 ? put_policy(cfg, q, vhost, list, err, errlen) : delete_policy(cfg, q, vhost, err, errlen);
    }
    cJSON_Delete(list);
    if (rc < 0 && !bounded) { /* only stale policies to delete: not worth stopping for */
        log_warn("cannot delete the policies of queues no longer bounded: %s", err);
        return 0;
    }
    if (rc < 0) {
        char shown[512], msg[1024];
        url_redact(cfg->rabbitmq_management_url, shown, sizeof shown);
        url_scrub(err, cfg->rabbitmq_management_url, msg, sizeof msg);
        snprintf(err, errlen, "rabbitmq.management_url (%s): %s", shown, msg);
    }
    return rc;
}
