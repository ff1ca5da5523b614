# All third-party packages are found here, once.
# LibTorch: Debian's libtorch-dev (1.13) is found by default; for an official LibTorch 2.x archive or a pip torch,
# pass -DCMAKE_PREFIX_PATH=<libtorch>/share/cmake (or `python3 -c 'import torch; print(torch.utils.cmake_prefix_path)'`).
find_package(Torch REQUIRED)
find_package(nlohmann_json 3.9 REQUIRED)
find_package(spdlog REQUIRED)
if(LORATUNE_WITH_VISION)
  find_package(OpenCV REQUIRED COMPONENTS core imgproc imgcodecs OPTIONAL_COMPONENTS freetype)
  find_package(CLI11 REQUIRED)
endif()
if(LORATUNE_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
message(STATUS "loratune: LibTorch ${Torch_VERSION}")
