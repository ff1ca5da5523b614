# All third-party packages are found here, once.
# LibTorch: Debian's libtorch-dev (1.13) is found by default; for an official LibTorch 2.x archive or a pip torch,
# pass -DCMAKE_PREFIX_PATH=<libtorch>/share/cmake (or `python3 -c 'import torch; print(torch.utils.cmake_prefix_path)'`).
find_package(Torch REQUIRED)
# The C++ ABI flag LibTorch was built with (pip wheels and archives differ), for every target here and googletest.
set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} ${TORCH_CXX_FLAGS}")
# LibTorch 2.13 and later headers require C++20.
if(Torch_VERSION VERSION_GREATER_EQUAL 2.13)
  set(CMAKE_CXX_STANDARD 20)
endif()

# On machines without the packages (the borrowed GPU machine), headers gathered by scripts/gpu/gather_deps.sh:
# nlohmann_json, spdlog and fmt header-only, googletest built from source.
set(LORATUNE_DEPS_DIR "" CACHE PATH "folder with include/ (nlohmann, spdlog, fmt) and googletest/ sources")
if(LORATUNE_DEPS_DIR)
  add_library(loratune_deps_json INTERFACE)
  target_include_directories(loratune_deps_json SYSTEM INTERFACE ${LORATUNE_DEPS_DIR}/include)
  add_library(nlohmann_json::nlohmann_json ALIAS loratune_deps_json)
  add_library(loratune_deps_spdlog INTERFACE)
  target_include_directories(loratune_deps_spdlog SYSTEM INTERFACE ${LORATUNE_DEPS_DIR}/include)
  target_compile_definitions(loratune_deps_spdlog INTERFACE SPDLOG_HEADER_ONLY SPDLOG_FMT_EXTERNAL FMT_HEADER_ONLY)
  add_library(spdlog::spdlog ALIAS loratune_deps_spdlog)
  if(LORATUNE_BUILD_TESTS)
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    add_subdirectory(${LORATUNE_DEPS_DIR}/googletest ${CMAKE_BINARY_DIR}/googletest EXCLUDE_FROM_ALL)
    if(NOT TARGET GTest::gtest_main)
      add_library(GTest::gtest_main ALIAS gtest_main)
    endif()
  endif()
else()
  find_package(nlohmann_json 3.9 REQUIRED)
  find_package(spdlog REQUIRED)
  if(LORATUNE_BUILD_TESTS)
    find_package(GTest REQUIRED)
  endif()
endif()
# ICU (Unicode classes for the CLIP tokenizer): required by the command line, optional for the core alone.
if(LORATUNE_WITH_VISION)
  find_package(ICU REQUIRED COMPONENTS uc)
else()
  find_package(ICU QUIET COMPONENTS uc)
endif()
set(LORATUNE_WITH_TEXT ${ICU_FOUND})
if(LORATUNE_WITH_VISION)
  find_package(OpenCV REQUIRED COMPONENTS core imgproc imgcodecs OPTIONAL_COMPONENTS freetype)
  find_package(CLI11 REQUIRED)
endif()
message(STATUS "loratune: LibTorch ${Torch_VERSION}")
