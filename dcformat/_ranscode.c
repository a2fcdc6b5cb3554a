/* Static rANS coder for dcz streams (spec/format.md section 7, "rANS streams").
 *
 * A C fast path for dcformat/rans.py; the Python loops there are the fallback and the reference. Python
 * parses and validates the frequency table and the stored states and produces every error message; this
 * module re-checks what it relies on (scale bound, frequencies summing to 2^scale, state bounds, symbols
 * inside the table) so that no call can make it read or write outside its buffers.
 *
 * The coding: two 32-bit states, symbol i coded by state i mod 2, renormalised by 16-bit little-endian
 * words. Encoding runs from the last symbol to the first and pushes words; the stream stores them in
 * the order the decoder reads them (the reverse), after the two final encoder states.
 *
 *   decode(words, scale, first, freqs, x0, x1, out) -> (decoded, words_used, x0, x1)
 *       words: the bytes after the two stored states (an odd trailing byte is never read); freqs: a
 *       native uint32 buffer, the frequency of symbols first, first + 1, ...; out: writable uint16 buffer
 *       of the symbol count. decoded < len(out) means a word was needed past the end (truncated).
 *   encode(symbols, scale, first, freqs[, lut[, prefix, suffix]]) -> bytes or bytearray
 *       symbols: native uint16 buffer; lut (or None): code lut[symbol] instead of symbol. Returns the two
 *       final states (u32 LE each) followed by the words; with prefix, as a bytearray with prefix zero bytes
 *       before them and suffix zero bytes after, for the caller to fill in place.
 *
 * And the raw bits of binned streams (section 8), the fast path of dcformat/binned.py's numpy code:
 *
 *   pack_bits(symbols, widths, values, out) -> bits written
 *       per symbol s, its widths[s] (uint8, <= 16) low bits of values[s] (uint16), MSB first, into the
 *       zeroed writable bytes out; stops (returning the bits so far) at a symbol past the tables or a field
 *       that would not fit in out.
 *   unpack_binned(bins, widths, tops, negative, center, alphabet, raw) -> (symbols done, bits read)
 *       per bin b (uint16, read and overwritten in place by its symbol): a = (tops[b] << widths[b]) | the
 *       next widths[b] raw bits; symbol = center -/+ a. Stops early at a bin past the tables, raw bits that
 *       run out, or a symbol outside 0..alphabet - 1.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Largest precision: the renormalisation bound freq << (32 - scale) needs scale <= 16 with 16-bit words. */
#define MAX_SCALE 16
/* Every state lies in [STATE_LOW, 2^32); it starts and must end at STATE_LOW. */
#define STATE_LOW (1u << 16)
/* Symbols are 16-bit: the table cannot reach past 65535. */
#define MAX_ALPHABET 65536

/* One decoder slot: the symbol owning the slot, the slot's offset inside the symbol's range, its frequency. */
typedef struct {
    uint16_t sym;
    uint16_t bias;
    uint32_t freq;
} slot_t;

/* Reads a contiguous native buffer of the given item size and struct format letter. */
static int
get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, const char *letters)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || (*f == '<' && PY_LITTLE_ENDIAN) || (*f == '>' && !PY_LITTLE_ENDIAN))
        f++;
    if (view->itemsize != itemsize || f[0] == '\0' || f[1] != '\0' || !strchr(letters, f[0])) {
        PyErr_Format(PyExc_TypeError, "expected a native %zd-byte unsigned buffer, got format '%s'", itemsize,
                     view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Checks the table: scale bound, span inside the alphabet, frequencies summing to exactly 2^scale. */
static int
check_table(int scale, Py_ssize_t first, const uint32_t *freq, Py_ssize_t span)
{
    if (scale < 1 || scale > MAX_SCALE) {
        PyErr_Format(PyExc_ValueError, "scale %d outside 1..%d", scale, MAX_SCALE);
        return -1;
    }
    if (span < 1 || first < 0 || first + span > MAX_ALPHABET) {
        PyErr_Format(PyExc_ValueError, "symbols %zd..%zd outside 0..%d", first, first + span - 1, MAX_ALPHABET - 1);
        return -1;
    }
    uint64_t total = 0;
    for (Py_ssize_t k = 0; k < span; k++)
        total += freq[k];
    if (total != (1ull << scale)) {
        PyErr_Format(PyExc_ValueError, "frequencies sum to %llu, not 2^%d", (unsigned long long)total, scale);
        return -1;
    }
    return 0;
}

/* Decodes one symbol with state x (a uint32_t lvalue) into dst[i]; on a needed word past the end, jumps to
 * label out of the loop. */
#define DECODE_ONE(x, i)                                                                   \
    do {                                                                                     \
        slot_t e_ = tab[(x) & mask];                                                         \
        dst[(i)] = e_.sym;                                                                   \
        (x) = e_.freq * ((x) >> scale) + e_.bias;                                            \
        if ((x) < STATE_LOW)                                                                 \
            (x) = ((x) << 16) | (uint32_t)(p[0] | (p[1] << 8)), p += 2;                     \
    } while (0)

static PyObject *
rans_decode(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer words, freqs, out;
    int scale;
    Py_ssize_t first;
    unsigned long long x0_in, x1_in;
    PyObject *freq_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "y*inOKKO:decode", &words, &scale, &first, &freq_obj, &x0_in, &x1_in, &out_obj))
        return NULL;
    if (get_buffer(freq_obj, &freqs, 0, 4, "IL") < 0) {
        PyBuffer_Release(&words);
        return NULL;
    }
    if (get_buffer(out_obj, &out, 1, 2, "H") < 0) {
        PyBuffer_Release(&words);
        PyBuffer_Release(&freqs);
        return NULL;
    }
    PyObject *result = NULL;
    slot_t *tab = NULL;
    const uint32_t *freq = (const uint32_t *)freqs.buf;
    const Py_ssize_t span = freqs.len / 4;
    if (check_table(scale, first, freq, span) < 0)
        goto done;
    if (x0_in < STATE_LOW || x0_in > 0xFFFFFFFFull || x1_in < STATE_LOW || x1_in > 0xFFFFFFFFull) {
        PyErr_Format(PyExc_ValueError, "states %llu, %llu outside [2^16, 2^32)", x0_in, x1_in);
        goto done;
    }
    tab = PyMem_Malloc(sizeof(slot_t) << scale);
    if (!tab) {
        PyErr_NoMemory();
        goto done;
    }
    uint16_t *dst = (uint16_t *)out.buf;
    const Py_ssize_t count = out.len / 2;
    const uint8_t *p = (const uint8_t *)words.buf;
    const uint8_t *const start = p, *const end = p + (words.len & ~(Py_ssize_t)1);
    const uint32_t mask = (1u << scale) - 1;
    uint32_t x0 = (uint32_t)x0_in, x1 = (uint32_t)x1_in;
    Py_ssize_t i = 0;

    Py_BEGIN_ALLOW_THREADS
    uint32_t slot = 0;
    for (Py_ssize_t k = 0; k < span; k++) {
        for (uint32_t b = 0; b < freq[k]; b++, slot++) {
            tab[slot].sym = (uint16_t)(first + k);
            tab[slot].bias = (uint16_t)b;
            tab[slot].freq = freq[k];
        }
    }
    /* Fast loop: two symbols per round, each reads at most one word, so two words must remain. */
    while (count - i >= 2 && end - p >= 4) {
        DECODE_ONE(x0, i);
        DECODE_ONE(x1, i + 1);
        i += 2;
    }
    /* Tail: one symbol at a time; a word needed past the end stops before counting the symbol. */
    while (i < count) {
        uint32_t x = (i & 1) ? x1 : x0;
        slot_t e = tab[x & mask];
        x = e.freq * (x >> scale) + e.bias;
        if (x < STATE_LOW) {
            if (p == end)
                break;
            x = (x << 16) | (uint32_t)(p[0] | (p[1] << 8));
            p += 2;
        }
        dst[i] = e.sym;
        if (i & 1)
            x1 = x;
        else
            x0 = x;
        i++;
    }
    Py_END_ALLOW_THREADS

    result = Py_BuildValue("nnkk", i, (Py_ssize_t)((p - start) / 2), (unsigned long)x0, (unsigned long)x1);
done:
    PyMem_Free(tab);
    PyBuffer_Release(&words);
    PyBuffer_Release(&freqs);
    PyBuffer_Release(&out);
    return result;
}

/* Encodes symbols n-1 .. 0 into the words ending at *top (writing backward, when top is set), and returns
 * the number of words; or -1 - index of a symbol outside the table. With a lookup table (binned streams),
 * symbol i is lut[s[i]], and an s[i] past the lut's end counts as outside the table. */
static Py_ssize_t
encode_pass(const uint16_t *s, Py_ssize_t n, const uint16_t *lut, Py_ssize_t lut_len, int scale, Py_ssize_t first,
            Py_ssize_t span, const uint32_t *freq, const uint32_t *cum, uint8_t *top, uint32_t *x_out)
{
    uint32_t x[2] = {STATE_LOW, STATE_LOW};
    Py_ssize_t words = 0;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        if (lut && (Py_ssize_t)s[i] >= lut_len)
            return -1 - i;
        Py_ssize_t k = (Py_ssize_t)(lut ? lut[s[i]] : s[i]) - first;
        if (k < 0 || k >= span || freq[k] == 0)
            return -1 - i;
        uint32_t f = freq[k], xi = x[i & 1];
        if ((uint64_t)xi >= ((uint64_t)f << (32 - scale))) {
            if (top) {
                top -= 2;
                top[0] = (uint8_t)xi;
                top[1] = (uint8_t)(xi >> 8);
            }
            words++;
            xi >>= 16;
        }
        x[i & 1] = ((xi / f) << scale) + (xi % f) + cum[k];
    }
    x_out[0] = x[0];
    x_out[1] = x[1];
    return words;
}

static PyObject *
rans_encode(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer symbols, freqs, lutb = {0};
    int scale;
    Py_ssize_t first;
    PyObject *sym_obj, *freq_obj, *lut_obj = Py_None, *result = NULL;
    Py_ssize_t prefix = -1, suffix = 0;
    if (!PyArg_ParseTuple(args, "OinO|Onn:encode", &sym_obj, &scale, &first, &freq_obj, &lut_obj, &prefix, &suffix))
        return NULL;
    if ((prefix < 0 && suffix) || suffix < 0) {
        PyErr_SetString(PyExc_ValueError, "prefix and suffix must be >= 0");
        return NULL;
    }
    if (get_buffer(sym_obj, &symbols, 0, 2, "H") < 0)
        return NULL;
    if (get_buffer(freq_obj, &freqs, 0, 4, "IL") < 0) {
        PyBuffer_Release(&symbols);
        return NULL;
    }
    if (lut_obj != Py_None && get_buffer(lut_obj, &lutb, 0, 2, "H") < 0) {
        PyBuffer_Release(&symbols);
        PyBuffer_Release(&freqs);
        return NULL;
    }
    const int have_lut = lut_obj != Py_None;
    static const uint16_t no_entries[1] = {0};
    const uint16_t *lut = have_lut ? (lutb.len ? (const uint16_t *)lutb.buf : no_entries) : NULL;
    const Py_ssize_t lut_len = have_lut ? lutb.len / 2 : 0;
    uint32_t *cum = NULL;
    const uint32_t *freq = (const uint32_t *)freqs.buf;
    const Py_ssize_t span = freqs.len / 4;
    if (check_table(scale, first, freq, span) < 0)
        goto done;
    cum = PyMem_Malloc(sizeof(uint32_t) * (size_t)span);
    if (!cum) {
        PyErr_NoMemory();
        goto done;
    }
    uint32_t c = 0;
    for (Py_ssize_t k = 0; k < span; k++) {
        cum[k] = c;
        c += freq[k];
    }
    const uint16_t *s = (const uint16_t *)symbols.buf;
    const Py_ssize_t n = symbols.len / 2;
    uint32_t x[2];
    /* Pass 1 sizes the output and checks every symbol; pass 2 writes. The GIL stays held so that no other
     * thread changes the symbols between the passes. */
    Py_ssize_t words = encode_pass(s, n, lut, lut_len, scale, first, span, freq, cum, NULL, x);
    if (words < 0) {
        PyErr_Format(PyExc_ValueError, "symbol at index %zd is not in the table", -1 - words);
        goto done;
    }
    /* With prefix (and suffix) given: a zeroed bytearray with that room before and after the states and words,
     * which the caller fills in place (a binned stream's header and table, and its raw bits). */
    const Py_ssize_t body = 8 + 2 * words;
    PyObject *outb = prefix < 0 ? PyBytes_FromStringAndSize(NULL, body)
                                : PyByteArray_FromStringAndSize(NULL, prefix + body + suffix);
    if (!outb)
        goto done;
    uint8_t *dst = prefix < 0 ? (uint8_t *)PyBytes_AS_STRING(outb) : (uint8_t *)PyByteArray_AS_STRING(outb);
    if (prefix >= 0) {
        memset(dst, 0, (size_t)prefix);
        memset(dst + prefix + body, 0, (size_t)suffix);
        dst += prefix;
    }
    encode_pass(s, n, lut, lut_len, scale, first, span, freq, cum, dst + 8 + 2 * words, x);
    for (int j = 0; j < 2; j++)
        for (int b = 0; b < 4; b++)
            dst[4 * j + b] = (uint8_t)(x[j] >> (8 * b));
    result = outb;
done:
    PyMem_Free(cum);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&freqs);
    if (have_lut)
        PyBuffer_Release(&lutb);
    return result;
}

/* Fields up to 16 bits go through a 64-bit accumulator; it is flushed whenever 8 or more bits are in it. */
#define MAX_FIELD_BITS 16

static PyObject *
pack_bits(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *sym_obj, *w_obj, *v_obj, *out_obj, *result = NULL;
    Py_buffer sym, wid, val, out;
    if (!PyArg_ParseTuple(args, "OOOO:pack_bits", &sym_obj, &w_obj, &v_obj, &out_obj))
        return NULL;
    if (get_buffer(sym_obj, &sym, 0, 2, "H") < 0)
        return NULL;
    if (get_buffer(w_obj, &wid, 0, 1, "B") < 0)
        goto release_sym;
    if (get_buffer(v_obj, &val, 0, 2, "H") < 0)
        goto release_wid;
    if (get_buffer(out_obj, &out, 1, 1, "B") < 0)
        goto release_val;
    const uint16_t *s = (const uint16_t *)sym.buf;
    const uint8_t *w = (const uint8_t *)wid.buf;
    const uint16_t *v = (const uint16_t *)val.buf;
    uint8_t *dst = (uint8_t *)out.buf;
    const Py_ssize_t n = sym.len / 2, table = wid.len < val.len / 2 ? wid.len : val.len / 2, cap = out.len;
    Py_ssize_t pos = 0, bits = 0;
    uint64_t acc = 0;
    int held = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint16_t k = s[i];
        if (k >= table || w[k] > MAX_FIELD_BITS)
            break;
        const int t = w[k];
        if (!t)
            continue;
        if ((bits + t + 7) / 8 > cap)
            break;
        acc = (acc << t) | (v[k] & ((1u << t) - 1));
        held += t;
        bits += t;
        while (held >= 8) {
            held -= 8;
            dst[pos++] = (uint8_t)(acc >> held);
        }
    }
    if (held)
        dst[pos] = (uint8_t)(acc << (8 - held));
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bits);
    PyBuffer_Release(&out);
release_val:
    PyBuffer_Release(&val);
release_wid:
    PyBuffer_Release(&wid);
release_sym:
    PyBuffer_Release(&sym);
    return result;
}

static PyObject *
unpack_binned(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *bins_obj, *w_obj, *top_obj, *neg_obj, *raw_obj, *result = NULL;
    Py_ssize_t center, alphabet;
    Py_buffer bins, wid, top, neg, raw;
    if (!PyArg_ParseTuple(args, "OOOOnnO:unpack_binned", &bins_obj, &w_obj, &top_obj, &neg_obj, &center, &alphabet,
                          &raw_obj))
        return NULL;
    if (get_buffer(bins_obj, &bins, 1, 2, "H") < 0)
        return NULL;
    if (get_buffer(w_obj, &wid, 0, 1, "B") < 0)
        goto release_bins;
    if (get_buffer(top_obj, &top, 0, 2, "H") < 0)
        goto release_wid;
    if (get_buffer(neg_obj, &neg, 0, 1, "B") < 0)
        goto release_top;
    if (get_buffer(raw_obj, &raw, 0, 1, "B") < 0)
        goto release_neg;
    uint16_t *b = (uint16_t *)bins.buf;
    const uint8_t *w = (const uint8_t *)wid.buf, *ng = (const uint8_t *)neg.buf, *src = (const uint8_t *)raw.buf;
    const uint16_t *tp = (const uint16_t *)top.buf;
    Py_ssize_t table = wid.len;
    if (top.len / 2 < table)
        table = top.len / 2;
    if (neg.len < table)
        table = neg.len;
    const Py_ssize_t n = bins.len / 2, avail = raw.len * 8;
    Py_ssize_t i = 0, bits = 0, pos = 0;
    uint64_t acc = 0;
    int held = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; i < n; i++) {
        const uint16_t k = b[i];
        if (k >= table || w[k] > MAX_FIELD_BITS)
            break;
        const int t = w[k];
        if (bits + t > avail)
            break;
        while (held < t) {
            acc = (acc << 8) | src[pos++];
            held += 8;
        }
        held -= t;
        const int64_t a = ((int64_t)tp[k] << t) | (int64_t)((acc >> held) & ((1u << t) - 1));
        const int64_t symbol = ng[k] ? (int64_t)center - a : (int64_t)center + a;
        if (symbol < 0 || symbol >= alphabet)
            break;
        bits += t;
        b[i] = (uint16_t)symbol;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", i, bits);
    PyBuffer_Release(&raw);
release_neg:
    PyBuffer_Release(&neg);
release_top:
    PyBuffer_Release(&top);
release_wid:
    PyBuffer_Release(&wid);
release_bins:
    PyBuffer_Release(&bins);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", rans_decode, METH_VARARGS,
     "decode(words, scale, first, freqs, x0, x1, out) -> (decoded, words_used, x0, x1): rANS decode into out."},
    {"encode", rans_encode, METH_VARARGS,
     "encode(symbols, scale, first, freqs[, lut[, prefix, suffix]]) -> bytes: the two final states then the "
     "16-bit words (with lut, uint16: codes lut[s] for each symbol s; with prefix: a bytearray with that many zero "
     "bytes before and suffix after)."},
    {"pack_bits", pack_bits, METH_VARARGS,
     "pack_bits(symbols, widths, values, out) -> bits: each symbol's raw bits, MSB first, into out."},
    {"unpack_binned", unpack_binned, METH_VARARGS,
     "unpack_binned(bins, widths, tops, negative, center, alphabet, raw) -> (done, bits): bins to symbols in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dcformat._ranscode",
    "C static rANS coder for dcz streams (fast path of dcformat.rans).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__ranscode(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "MAX_SCALE", MAX_SCALE) < 0 ||
              PyModule_AddIntConstant(m, "STATE_LOW", STATE_LOW) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
