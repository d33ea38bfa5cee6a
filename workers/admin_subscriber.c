/* admin_subscriber.c - conveyor-admin subscriber install|status --database
 * URL: the subscriber's inbox (sql/subscriber/: conveyor.inbox,
 * conveyor.consume) in a subscriber's own database, installed and looked at.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Installs or upgrades the inbox; says which. */
static int subscriber_install(struct db *db, const char *label) {
    char err[1024];
    int applied = migrate_subscriber(db, err, sizeof err);
    if (applied < 0) {
        fprintf(stderr, "conveyor-admin: %s: %s\n", label, err);
        return exit_of_class(applied);
    }
    printf("%s: the inbox (conveyor.inbox, conveyor.consume) %s (%d migration%s applied)\n", label,
           applied ? "installed" : "up to date", applied, applied == 1 ? "" : "s");
    return 0;
}

/* Prints, per subscription, the events consumed and the newest's time. */
static int subscriber_status(struct db *db, const char *label, bool json) {
    PGresult *r;
    if (db_exec(db, "SELECT subscription, count(*), max(consumed_at)::text FROM conveyor.inbox "
                    "GROUP BY subscription ORDER BY subscription", 0, NULL, &r) < 0) {
        fprintf(stderr, "conveyor-admin: %s: %s (is the inbox installed? conveyor-admin subscriber install)\n", label,
                db_errstr(db));
        return exit_of_class(db_err(db));
    }
    for (int i = 0; i < PQntuples(r); i++) {
        if (json) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "kind", "inbox");
            cJSON_AddStringToObject(o, "subscription", PQgetvalue(r, i, 0));
            cJSON_AddNumberToObject(o, "consumed", strtod(PQgetvalue(r, i, 1), NULL));
            cJSON_AddStringToObject(o, "lastConsumedAt", PQgetvalue(r, i, 2));
            char *line = cJSON_PrintUnformatted(o);
            if (line) puts(line);
            cJSON_free(line);
            cJSON_Delete(o);
        } else {
            printf("%s: subscription %s: %s events consumed in the inbox's window, the last at %s\n", label,
                   PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2));
        }
    }
    if (!json && PQntuples(r) == 0) printf("%s: the inbox holds no event\n", label);
    PQclear(r);
    return 0;
}

int admin_subscriber(char **words, int n, const char *database, bool json) {
    const char *verb = n >= 2 ? words[1] : "";
    if ((strcmp(verb, "install") != 0 && strcmp(verb, "status") != 0) || n != 2 || !database) {
        fprintf(stderr, "usage: conveyor-admin subscriber install|status --database URL\n");
        return EXIT_USAGE;
    }
    char label[512], err[512];
    url_redact(database, label, sizeof label);
    int cls = CV_ERETRY;
    struct db *db = db_connect_class(database, &cls, err, sizeof err);
    if (!db) {
        fprintf(stderr, "conveyor-admin: %s: %s\n", label, err);
        return exit_of_class(cls);
    }
    int rc = strcmp(verb, "install") == 0 ? subscriber_install(db, label) : subscriber_status(db, label, json);
    db_close(db);
    return rc;
}
