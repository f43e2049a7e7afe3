/*
 * mpi-hello: the MPI test program of the "mpi" test image (tools/images/build.py).
 *
 * Every rank prints one line:
 *
 *     hello from rank R of N on HOST
 *
 * followed by " (SLURMD_NODENAME=NAME)" when that variable is set, as it is
 * for tasks started by srun.  The ranks then check that they can really talk
 * to each other (an MPI_Allreduce of their ranks); a wrong sum is reported on
 * stderr and makes the program exit with status 1.
 *
 * Debian's MPICH uses UCX, whose shared-memory transports need /proc (and its
 * TCP transport /sys).  Container runtimes mount both; a bare
 * `chroot ROOT /usr/local/bin/mpi-hello` does not, and MPI_Init then fails
 * even for a single process.  So that this smoke test still works, a
 * singleton (no PMI_FD/PMI_PORT from a process manager) in a root without
 * /proc limits UCX to its loopback transport (UCX_TLS=self) unless UCX_TLS is
 * already set, and says so on stderr.  Several ranks always need /proc and /sys.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void singleton_without_proc(void)
{
    if (getenv("PMI_FD") != NULL || getenv("PMI_PORT") != NULL || getenv("UCX_TLS") != NULL) {
        return;
    }
    if (access("/proc/self/stat", R_OK) == 0) {
        return;
    }
    fprintf(stderr, "mpi-hello: no /proc here: singleton run with UCX_TLS=self\n");
    setenv("UCX_TLS", "self", 0);
}

int main(int argc, char **argv)
{
    int rank = 0;
    int size = 0;
    int name_len = 0;
    long sum = 0;
    long expected = 0;
    char host[MPI_MAX_PROCESSOR_NAME] = "";
    const char *slurmd_node = NULL;

    singleton_without_proc();
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &name_len);

    slurmd_node = getenv("SLURMD_NODENAME");
    if (slurmd_node != NULL && slurmd_node[0] != '\0') {
        printf("hello from rank %d of %d on %s (SLURMD_NODENAME=%s)\n", rank, size, host,
               slurmd_node);
    } else {
        printf("hello from rank %d of %d on %s\n", rank, size, host);
    }
    fflush(stdout);

    long mine = rank;
    MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    expected = (long)size * (size - 1) / 2;
    if (sum != expected) {
        fprintf(stderr, "mpi-hello: rank %d: allreduce gave %ld, expected %ld\n", rank, sum,
                expected);
        MPI_Finalize();
        return 1;
    }

    MPI_Finalize();
    return 0;
}
