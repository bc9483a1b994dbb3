from lmtool.launch import main

main()
