// Integers read from image file headers, in either byte order.
#pragma once

#include <cstdint>

namespace loratune {

inline uint32_t read_le16(const unsigned char* p) { return p[0] | (p[1] << 8); }
inline uint32_t read_le32(const unsigned char* p) { return read_le16(p) | (read_le16(p + 2) << 16); }
inline uint32_t read_be16(const unsigned char* p) { return (p[0] << 8) | p[1]; }
inline uint32_t read_be32(const unsigned char* p) { return (read_be16(p) << 16) | read_be16(p + 2); }

}  // namespace loratune
