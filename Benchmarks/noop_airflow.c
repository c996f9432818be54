/* A no-op `airflow` for the benchmarks: accepts `airflow tasks run DAG TASK RUN_ID ...` and exits 0 at once,
 * so what is measured is the executor (claim, spawn, wait, result write, ack), not Airflow.
 * Built by Benchmarks/run with gcc (static when libc.a is available). */
#include <string.h>
int main(int argc, char **argv) {
    if (argc >= 6 && strcmp(argv[1], "tasks") == 0 && strcmp(argv[2], "run") == 0) return 0;
    return 2;
}
