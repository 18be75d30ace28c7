/* float32 LoRA for one layer, row by row (loraswap.vllm_plugin.row_kernel).
 *
 * For each row r with slot s = idx[r] >= 0 and each slice i the slot's adapter targets:
 *   y[r, offs[i] : offs[i] + outs[i]] += (scale * (x[r] @ A[s, i, :rank]^T)) @ B[s, i, :, :rank]^T
 * reading only the first `rank` (ranks[s, i]) rows of lora_a and columns of lora_b, straight from
 * vLLM's stacked tensors (no copies). A row's arithmetic is fixed (the same summation order in
 * every dot product, no FMA contraction: built with -ffp-contract=off), whatever the other rows
 * are and however the rows are split between threads: batch invariant by construction.
 */
#include <stdint.h>

#define LANES 16

/* dot(x, w) over n: LANES partial sums by position, then a fixed pairwise tree. */
static inline float dot_fixed(const float *restrict x, const float *restrict w, int64_t n)
{
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += x[k + l] * w[k + l];
    for (int l = 0; k + l < n; l++)
        acc[l] += x[k + l] * w[k + l];
    for (int half = LANES / 2; half > 0; half /= 2)
        for (int l = 0; l < half; l++)
            acc[l] += acc[l + half];
    return acc[0];
}

/* x: [n_rows, n_in] with row stride ldx; y: [n_rows, ...] with row stride ldy (added into).
 * a[i]: slice i's lora_a stacked, [n_slots, max_rank, n_in] contiguous; b[i]: slice i's lora_b
 * stacked, [n_slots, outs[i], max_rank] contiguous; ranks: [n_slots, n_slices] (0: the slot's
 * adapter leaves the slice alone). Rows with a negative or out-of-range slot are left as they are. */
void loraswap_lora_rows(int64_t n_rows, int64_t n_in, const float *x, int64_t ldx, float *y,
                        int64_t ldy, const int64_t *idx, int64_t n_slots, int64_t n_slices,
                        const float *const *a, const float *const *b, const int32_t *ranks,
                        int64_t max_rank, const int64_t *offs, const int64_t *outs, float scale,
                        int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t slot = idx[r];
        if (slot < 0 || slot >= n_slots)
            continue;
        const float *xr = x + r * ldx;
        float *yr = y + r * ldy;
        float s[max_rank > 0 ? max_rank : 1];
        for (int64_t i = 0; i < n_slices; i++) {
            const int64_t rank = ranks[slot * n_slices + i];
            if (rank <= 0)
                continue;
            const float *A = a[i] + slot * max_rank * n_in;
            for (int64_t j = 0; j < rank; j++)
                s[j] = scale * dot_fixed(xr, A + j * n_in, n_in);
            const int64_t out = outs[i];
            const float *B = b[i] + slot * out * max_rank;
            float *yo = yr + offs[i];
            for (int64_t n = 0; n < out; n++) {
                const float *bn = B + n * max_rank;
                float acc = 0.0f;
                for (int64_t j = 0; j < rank; j++)
                    acc += s[j] * bn[j];
                yo[n] += acc;
            }
        }
    }
}
