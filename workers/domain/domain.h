/*
 * domain.h - the header of workers/domain/: what a command handler needs and
 * nothing more. Payload validation (validate.c), the command table and the
 * context a handler works in (handler.c), the handlers (handler_*.c). It
 * includes only core.h; the pool's processes see it through workers.h.
 */
#ifndef CONVEYOR_DOMAIN_H
#define CONVEYOR_DOMAIN_H

#include "core.h"


/* ---- validate.c: payload rules, collecting every broken one ------------------- */
struct verr {
    cJSON *fields; /* {field: reason}; NULL while nothing is wrong; owned */
    const char *prefix; /* prepended to field names in errors ("items[2]."), or NULL */
};
/* Records reason for prefix+field (a field keeps its first reason); copies both. */
void verr_add(struct verr *v, const char *field, const char *reason);
/* True once an error is recorded. */
bool verr_any(const struct verr *v);
/* Frees the recorded errors (fields NULL again, v reusable); nothing recorded is fine. */
void verr_free(struct verr *v);

/* What a v_* found: not an error class (an invalid field is recorded in the
 * verr; the handler rejects with all of them). V_ABSENT is 0, so !r is "absent". */
enum v_result {
    V_ABSENT, /* a missing or null field (an error is recorded if required) */
    V_VALID,  /* present and valid: *out is written */
    V_INVALID /* present and invalid (an error is recorded) */
};
/* Each v_* reads obj[field] and returns an enum v_result. Strings written to
 * *out are malloc'd; the caller frees them (v_password's points into obj
 * instead). Unless V_VALID, *out is NULL or "" (v_int leaves *out untouched). */
enum v_result v_string(struct verr *v, const cJSON *obj, const char *field, bool required, bool trim,
             size_t min_chars, size_t max_chars, char **out);
enum v_result v_uuid(struct verr *v, const cJSON *obj, const char *field, bool required, char out[ID_LEN + 1]);
/* An integral JSON number in [min, max]. */
enum v_result v_int(struct verr *v, const cJSON *obj, const char *field, bool required, long long min,
          long long max, long long *out);
/* A price: a number or decimal string, 0..99999999.99, at most 2 decimals;
 * written as "123.40". */
enum v_result v_price(struct verr *v, const cJSON *obj, const char *field, bool required, char out[32]);
/* An email per docs/contract.md ("register"), trimmed (the handler stores it lower-cased:
 * PostgreSQL's lower(), the mapping of the users_email_check constraint). */
enum v_result v_email(struct verr *v, const cJSON *obj, const char *field, bool required, char **out);
/* A password per docs/contract.md ("register"): 8-128 bytes, an upper-case letter, a lower-case letter, a digit. */
enum v_result v_password(struct verr *v, const cJSON *obj, const char *field, bool required, const char **out);

/* ---- handler.c: the command table and the context a handler works in ---------- */
struct rejection {
    const char *code;      /* VALIDATION_FAILED, NOT_FOUND, ... (static) */
    char message[256];
    cJSON *fields;         /* owned, may be NULL */
    cJSON *details;        /* owned, may be NULL */
};

/* Running ahead (batch.c): a batch's handlers send their first statements
 * together, in one round trip, then finish in order with their results. The
 * handshake is not an error class: ctx_exec stops the handler by setting
 * ctx->paused (and returning CV_ERETRY, which the handler returns as it
 * returns any error); batch.c reads ctx->paused, never the class, to tell
 * "run me again" from a failure. */
enum ahead_stage {
    AHEAD_OFF,    /* every statement runs now (db_exec) */
    AHEAD_SEND,   /* the first statement is deferred; ctx_exec pauses the handler */
    AHEAD_RESUME, /* the first statement's result is *first; a second pauses the handler */
};

struct cmd_ctx {
    struct db *db;
    const struct cfg *cfg;
    const struct envelope *cmd;
    cJSON *events;         /* array of event envelopes to write to the outbox; owned */
    bool validate_only;    /* return 0 once the payload passed validation (tests, fuzzing) */
    struct rejection rej;
    enum ahead_stage ahead;
    int *handle;           /* AHEAD_SEND: where the first statement's result handle goes (db_defer_result) */
    PGresult **first;      /* AHEAD_RESUME: the first statement's result, taken by ctx_exec (not owned) */
    int statements;        /* ctx_exec calls so far */
    bool paused;           /* set by ctx_exec when it stopped the handler to be run again later (running
                            * ahead): what the handler returned is then not its outcome */
};

/* A handler validates cmd->payload and applies it inside the open transaction.
 * Returns 0 after emitting its events, CV_EREJECT with ctx->rej filled (the
 * caller rolls back the domain changes and emits command.rejected), or
 * CV_ERETRY / CV_EREFUSED from the database, or what ctx_exec returned when it
 * paused the handler (ctx->paused: run it again). With validate_only, 0 once
 * the payload passed, before any statement. */
typedef int (*handler_fn)(struct cmd_ctx *ctx);

/* The rows a command will lock, stated before it runs, so that a batch takes
 * its locks in one order (batch.c) and concurrent batches never deadlock. */
enum lock_keys {
    LOCKS_NONE,           /* no row that another command waits for (a new row of a new id) */
    LOCKS_PRODUCT,        /* the product payload.productId */
    LOCKS_USER,           /* the user payload.userId */
    LOCKS_ITEM_PRODUCTS,  /* the products payload.items[].productId */
    LOCKS_ORDER_PRODUCTS, /* the products of the items of order payload.orderId, then that order */
};

/* A command type's handler. */
struct handler {
    const char *type;
    handler_fn run;
    enum lock_keys locks;
    /* it can run ahead (batch.c): it does the same until its first statement
     * each time it runs (no clock, no random id, no password hash before it),
     * and usually needs no other */
    bool runs_ahead;
    /* the payload field naming the aggregate it acts on: its default ordering
     * key in a laned queue (docs/contract.md, "Lanes"), or NULL */
    const char *order_field;
};

/* The handler of TYPE, or NULL when this build does not know it. */
const struct handler *handler_find(const char *type);
/* The key that orders a command among those of its batch: "p:<productId>" or
 * "u:<userId>" for a command that locks one row, the least id of several
 * products, or "" (nothing, or not a usable id). Written to out. */
void handler_lock_key(const struct handler *h, const cJSON *payload, char out[ID_LEN + 3]);
/* Appends to products (a cJSON array of strings) the ids of the products the
 * command locks that its payload names, and to orders the order whose items'
 * products it locks. Ids that are not UUIDs are left out (the handler rejects them). */
void handler_lock_rows(const struct handler *h, const cJSON *payload, cJSON *products, cJSON *orders);
/* A handler's statement: db_exec on ctx->db, except when running ahead: in
 * AHEAD_SEND the first statement is deferred (its handle in *ctx->handle) and
 * the handler paused; in AHEAD_RESUME the first returns its result (*out,
 * owned by the caller) and a second pauses the handler (the command then runs
 * again, not ahead; so does a first statement that failed: *ctx->first NULL).
 * Pausing sets ctx->paused and returns CV_ERETRY, with *out NULL: the handler
 * returns it as it returns any error, and the caller (batch.c) acts on
 * ctx->paused, not on the class. A deferral that fails returns its error class
 * (not paused). Otherwise as db_exec. */
int ctx_exec(struct cmd_ctx *ctx, const char *sql, int nparams, const char *const *params, PGresult **out);
/* Appends an event (event_new: takes data, NULL gives {}) to ctx->events, made
 * on first use and owned by ctx. */
void ctx_emit(struct cmd_ctx *ctx, const char *type, const char *aggregate_type,
              const char *aggregate_id, cJSON *data);
/* Fills ctx->rej; takes fields and details (freeing those of an earlier
 * rejection); code is kept, not copied (a static string). Returns CV_EREJECT. */
int ctx_reject(struct cmd_ctx *ctx, const char *code, cJSON *fields, cJSON *details,
               const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Rejects with VALIDATION_FAILED and the fields of v (taken: v->fields is NULL
 * after). Returns CV_EREJECT. */
int ctx_reject_invalid(struct cmd_ctx *ctx, struct verr *v);
/* Appends the command.rejected event of ctx's command to ctx->events (as
 * ctx_emit): data {code, message, fields?, details?} from ctx->rej, whose
 * fields and details it takes. The one builder of a rejection's event: a
 * worker's (batch.c) and an operator's cancel of a parked command
 * (parked_view.c) both call it. */
void ctx_emit_rejection(struct cmd_ctx *ctx);

/* The handlers of the command table: each a handler_fn (see above). */
int handle_register(struct cmd_ctx *ctx);
int handle_change_password(struct cmd_ctx *ctx);
int handle_create_product(struct cmd_ctx *ctx);
int handle_update_product(struct cmd_ctx *ctx);
int handle_update_stock(struct cmd_ctx *ctx);
int handle_delete_product(struct cmd_ctx *ctx);
int handle_place_order(struct cmd_ctx *ctx);
int handle_cancel_order(struct cmd_ctx *ctx);

/* stock.low / stock.depleted for a product whose stock went from prev to next. */
void emit_stock_notifications(struct cmd_ctx *ctx, const char *product_id, long long prev, long long next);
/* Hashes a password with argon2id at the configured cost into out (a
 * crypto_pwhash_str string). Returns 0, or CV_ERETRY when the memory for it
 * could not be had (logged as an error with the command id). */
int password_hash(const struct cmd_ctx *ctx, const char *password, char out[128]);

#endif
