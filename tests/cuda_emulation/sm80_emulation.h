// CPU versions of the sm80 collectives of csrc/cuda/sm80_primitives.cuh (included there, inside
// namespace fastattn::cuda, when FASTATTN_SM80_EMULATION names this file). They follow the PTX ISA's
// fragment layouts of ldmatrix and mma.m16n8k16, independently of how the kernels use them.

inline void cp_async_16(void* shared, const void* global, int source_bytes) {
  if (source_bytes < 0 || source_bytes > 16) std::abort();
  ::emulation::context.uncommitted.push_back({shared, global, source_bytes});
}

inline void cp_async_commit() {
  auto& context = ::emulation::context;
  context.committed.push_back(std::move(context.uncommitted));
  context.uncommitted.clear();
}

// Retires the oldest groups until at most Pending remain in flight.
template <int Pending>
inline void cp_async_wait() {
  auto& committed = ::emulation::context.committed;
  while (committed.size() > static_cast<size_t>(Pending)) {
    for (const auto& copy : committed.front()) {
      std::memcpy(copy.shared, copy.global, copy.source_bytes);
      std::memset(static_cast<unsigned char*>(copy.shared) + copy.source_bytes, 0, 16 - copy.source_bytes);
    }
    committed.pop_front();
  }
}

struct LoadedMatrices {
  uint32_t registers[4];
};

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; register i of lane l holds
// elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i (with .trans: of its transpose).
inline void emulated_ldmatrix_x4(uint32_t (&r)[4], const void* shared, bool transpose) {
  const int lane = ::emulation::context.lane;
  const LoadedMatrices loaded = ::emulation::exchange(shared, [lane, transpose](auto address_of) {
    LoadedMatrices out{};
    for (int i = 0; i < 4; ++i) {
      uint16_t lo, hi;
      if (transpose) {
        lo = static_cast<const uint16_t*>(address_of(8 * i + 2 * (lane % 4)))[lane / 4];
        hi = static_cast<const uint16_t*>(address_of(8 * i + 2 * (lane % 4) + 1))[lane / 4];
      } else {
        const uint16_t* row = static_cast<const uint16_t*>(address_of(8 * i + lane / 4));
        lo = row[2 * (lane % 4)];
        hi = row[2 * (lane % 4) + 1];
      }
      out.registers[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    return out;
  });
  for (int i = 0; i < 4; ++i) r[i] = loaded.registers[i];
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* shared) { emulated_ldmatrix_x4(r, shared, false); }

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* shared) { emulated_ldmatrix_x4(r, shared, true); }

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};

struct MmaResult {
  float c[4];
};

// mma.m16n8k16.row.col: lane l (g = l / 4, t = l % 4) holds A(g, 2t..), A(g+8, 2t..), A(g, 2t+8..),
// A(g+8, 2t+8..) in a[0..3], B(2t.., g) and B(2t+8.., g) in b[0..1], and C(g, 2t..), C(g+8, 2t..).
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = ::emulation::context.lane;
  const MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const MmaResult product = ::emulation::exchange(mine, [lane](auto operands_of) {
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const MmaOperands ops = operands_of(l);
      const int a_rows[4] = {g, g + 8, g, g + 8}, a_cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int i = 0; i < 4; ++i) {
        const float2 pair = MmaType<T>::unpack(ops.a[i]);
        A[a_rows[i]][a_cols[i]] = pair.x;
        A[a_rows[i]][a_cols[i] + 1] = pair.y;
      }
      for (int i = 0; i < 2; ++i) {
        const float2 pair = MmaType<T>::unpack(ops.b[i]);
        B[2 * t + 8 * i][g] = pair.x;
        B[2 * t + 8 * i + 1][g] = pair.y;
      }
    }
    const int g = lane / 4, t = lane % 4;
    MmaResult out{};
    for (int k = 0; k < 16; ++k) {
      out.c[0] += A[g][k] * B[k][2 * t];
      out.c[1] += A[g][k] * B[k][2 * t + 1];
      out.c[2] += A[g + 8][k] * B[k][2 * t];
      out.c[3] += A[g + 8][k] * B[k][2 * t + 1];
    }
    return out;
  });
  for (int i = 0; i < 4; ++i) c[i] += product.c[i];
}
