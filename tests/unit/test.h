/* test.h - a minimal test harness: TEST(name) cases, CHECK macros, and a main
 * that runs the case named by argv[1] (CTest runs each as its own entry) or all. */
#ifndef CONVEYOR_TEST_H
#define CONVEYOR_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*test_fn)(void);
static struct { const char *name; test_fn fn; } test_cases[512];
static int test_ncases, test_failures;

#define TEST(case_)                                                                       \
    static void test_##case_(void);                                                       \
    __attribute__((constructor)) static void register_##case_(void) {                     \
        test_cases[test_ncases].name = #case_;                                            \
        test_cases[test_ncases++].fn = test_##case_;                                      \
    }                                                                                     \
    static void test_##case_(void)

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
            test_failures++;                                                              \
        }                                                                                 \
    } while (0)

#define CHECK_STR(a, b)                                                                   \
    do {                                                                                  \
        const char *a_ = (a), *b_ = (b);                                                  \
        if (!a_ || !b_ || strcmp(a_, b_) != 0) {                                          \
            fprintf(stderr, "%s:%d: CHECK_STR failed: %s is \"%s\", want \"%s\"\n",        \
                    __FILE__, __LINE__, #a, a_ ? a_ : "(null)", b_ ? b_ : "(null)");       \
            test_failures++;                                                              \
        }                                                                                 \
    } while (0)

static inline int test_main(int argc, char **argv) {
    int ran = 0;
    for (int i = 0; i < test_ncases; i++) {
        if (argc > 1 && strcmp(argv[1], test_cases[i].name) != 0) continue;
        int before = test_failures;
        test_cases[i].fn();
        printf("%s %s\n", test_failures == before ? "ok" : "FAIL", test_cases[i].name);
        ran++;
    }
    if (ran == 0) {
        fprintf(stderr, "no test case named '%s'\n", argc > 1 ? argv[1] : "");
        return 2;
    }
    return test_failures ? 1 : 0;
}
#define TEST_MAIN() int main(int argc, char **argv) { return test_main(argc, argv); }

#endif
